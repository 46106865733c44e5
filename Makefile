# The README's two commands: `make demo` and `make test`. Both create .venv when missing and install the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and explicitly: on machines with a local wheel cache (and a pip cap) these exact releases
# install from disk; elsewhere override, e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/train_tokenizer.py --config jobs/configs/tokenizer_tiny.yaml --storage-path demo_output/runs \
		--mlflow-uri sqlite:///$(CURDIR)/demo_output/mlflow.db
	$(PY) jobs/pretokenize.py --input samples/images --output demo_output/tokens \
		--tokenizer demo_output/runs/tokenizer-tiny/tokenizer --mlflow-uri sqlite:///$(CURDIR)/demo_output/mlflow.db
	$(PY) jobs/train_t2i.py --config jobs/configs/t2i_tiny.yaml --mlflow-uri sqlite:///$(CURDIR)/demo_output/mlflow.db
	$(PY) jobs/generate.py --model demo_output/runs/t2i-tiny/model --tokenizer demo_output/runs/tokenizer-tiny/tokenizer \
		--prompt "A ginger tabby cat looking to the side." --prompt "A rocket standing on its launch pad under a blue sky." \
		--images-per-prompt 2 --loop 3 --cfg 3 --output demo_output/samples
	$(PY) jobs/train_i2t.py --config jobs/configs/i2t_tiny.yaml --stage align \
		--mlflow-uri sqlite:///$(CURDIR)/demo_output/mlflow.db
	@echo "asking the understanding model about samples/images/chelsea.jpg (40 steps of a random decoder: noise)"
	$(PY) jobs/chat.py --model demo_output/runs/i2t-tiny/model --tokenizer demo_output/runs/tokenizer-tiny/tokenizer \
		--image samples/images/chelsea.jpg --prompt "What is in the image?" --max-new-tokens 16
	@echo "trained tokenizer: demo_output/runs/tokenizer-tiny/tokenizer/ (checkpoints next to it)"
	@echo "token shards: demo_output/tokens/shards/  rejects: demo_output/tokens/rejects/  summary: demo_output/tokens/manifest.json"
	@echo "text-to-image model: demo_output/runs/t2i-tiny/model/  samples: demo_output/samples/ (images/, samples.parquet)"
	@echo "understanding model (align stage): demo_output/runs/i2t-tiny/model/"
	@echo "MLflow UI (runs in experiments 'tokenizer', 'pretokenize', 't2i' and 'i2t'):"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/demo_output/mlflow.db"

# The unit tests (CPU only, no servers) run at the lowest priority beside the integration tests, which spend much of
# their time waiting on Ray, servers and subprocesses; their report follows the integration tests'. Both must pass.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	@nice -n 19 $(PY) -m pytest -q tests/unit tests/gpu > .unit-tests.log 2>&1 & unit=$$!; \
	$(PY) -m pytest -q tests/integration; integration=$$?; \
	wait $$unit; units=$$?; \
	echo "---- tests/unit, tests/gpu (run alongside) ----"; cat .unit-tests.log; \
	test $$integration -eq 0 -a $$units -eq 0

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/quantizer.py
	$(PY) bench/dedup.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) demo_output
