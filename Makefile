# Fresh-machine entry points (see README.md):
#   make demo   set up the current-release stack and run the main job
#   make test   set up the three supported stacks and run the test suite on each
PYTHON ?= python3
VENVS ?= .venvs
STACKS := jit pmap latest
PYTEST_ARGS ?=

.PHONY: demo test bench peers clean $(addprefix test-,$(STACKS))

$(VENVS)/%/installed: constraints/%.txt setup.py
	rm -rf $(VENVS)/$*
	$(PYTHON) -m venv $(VENVS)/$*
	$(VENVS)/$*/bin/python -m pip install -q --upgrade pip
	$(VENVS)/$*/bin/python -m pip install -q -c constraints/$*.txt -e '.[test]'
	touch $@

demo: $(VENVS)/latest/installed
	$(VENVS)/latest/bin/python -m weight_averaging demo

$(addprefix test-,$(STACKS)): test-%: $(VENVS)/%/installed
	@echo "=== stack '$*': $$($(VENVS)/$*/bin/python -c 'import jax, optax; print("jax", jax.__version__, "optax", optax.__version__)')"
	$(VENVS)/$*/bin/python -m pytest $(PYTEST_ARGS)

# Runs every stack even when one fails, then fails if any did.
test:
	@failed=""; \
	for stack in $(STACKS); do \
	  $(MAKE) --no-print-directory test-$$stack || failed="$$failed $$stack"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED stacks:$$failed"; exit 1; fi; \
	echo "all stacks passed: $(STACKS)"

bench: $(VENVS)/latest/installed
	$(VENVS)/latest/bin/python benchmarks/averaging.py

# The side-by-side benchmark's own environment: PyTorch, timm (which needs
# torchvision) and ema-pytorch, never the package's requirements.
PEERS_TORCH ?= torch==2.14.1 torchvision==0.29.1
$(VENVS)/peers/installed: setup.py
	rm -rf $(VENVS)/peers
	$(PYTHON) -m venv $(VENVS)/peers
	$(VENVS)/peers/bin/python -m pip install -q --upgrade pip
	$(VENVS)/peers/bin/python -m pip install -q $(PEERS_TORCH)
	$(VENVS)/peers/bin/python -m pip install -q timm ema-pytorch -e .
	touch $@

peers: $(VENVS)/peers/installed
	$(VENVS)/peers/bin/python benchmarks/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENVS)
