# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# This environment's pins only (pyproject.toml declares ranges): the torch and
# torchvision pair that pip's local copies hold. onnxruntime-gpu also runs on
# CPU-only machines (CPUExecutionProvider); never install it beside onnxruntime.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
ORT        := onnxruntime-gpu
# ruff pinned: a new release with new default rules cannot break `make lint`.
RUFF       := ruff==0.17.6

.PHONY: demo test test-slow fuzz bench bench-scaling bench-giant lint clean zoo

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet $(ORT) -e ".[test,timm]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Measured figures into benchmarks/results/ (14 minutes on 2 cores, end to end); BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/inference.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/fx_fold.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/precision.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/training.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/onnx_fold.py $(BENCH_ARGS) $(if $(BENCH_ARGS),,--json benchmarks/results/onnx_fold_vit_base_patch16_224.json)

# Fold time and memory against model size, ViT-S to ViT-g, float32 and bfloat16, in fx (new model and in
# place), torch.export and ONNX, beside copy.deepcopy and PEFT's merge (benchmarks/results/scaling.{json,md,png};
# about 25 minutes on 2 cores, 20 GB of memory, 9 GB of disk).
bench-scaling: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/scaling.py

# A 6B-parameter bfloat16 ViT (InternViT-6B's shape) inserted and folded in place, against PEFT's merge
# (benchmarks/results/giant.{json,md}; about 5 minutes on 2 cores, 14 GB of memory).
bench-giant: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/giant.py

# The model zoo into benchmarks/results/zoo.{md,json}: every torchvision classification/video/segmentation
# model and one timm model per family, through fx, TorchScript ONNX and dynamo ONNX (193 models: about 100 min
# on 2 cores, timm's half 45 of them).
# ZOO_ARGS="--subset ci" for the ~20 models of tests/test_zoo.py; "--resume" to go on after an interruption.
# The zoo extra (ultralytics, diffusers: their rows) is installed here only, never for `test` or `demo`.
zoo: $(STAMP)
	$(BIN)/pip install --quiet -e ".[zoo]"
	YOLO_OFFLINE=1 $(BIN)/python benchmarks/zoo.py $(ZOO_ARGS)

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q tests/test_properties.py tests/test_cli_fuzz.py

lint: $(STAMP)
	$(BIN)/pip install --quiet $(RUFF) && $(BIN)/ruff check repfold patterns tests examples benchmarks tools
	$(BIN)/python tools/check_imports.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
