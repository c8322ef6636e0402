# kolors-trt: `make engines` (checkpoint -> ONNX -> engines) and `make test`.
# Both create the virtualenv and install everything on first use.
#
#   WEIGHTS=/path/Kolors-diffusers IP_ADAPTER=/path/Kolors-IP-Adapter-Plus make engines
#   make engines                      # on the embedded tiny default checkpoint
#   TORCH_SPEC="torch==2.13.0" EXTRAS="export,test,tensorrt" make engines   # GPU host

PYTHON     ?= python3
VENV       ?= .venv
# A bare `torch` pulls several GB of CUDA wheels: pin it (GPU hosts override this).
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= export,test,tensorrt-rtx,bench,serve,ray,quantize
OUT        ?= out
WEIGHTS    ?=
IP_ADAPTER ?=
PRECISION  ?= fp16
TARGET     ?=
BUILD_ARGS ?=
# export skips an unchanged checkpoint ("up to date"); EXPORT_ARGS=--force re-exports
EXPORT_ARGS ?=
PYTEST_ARGS ?= -n 2
# The tiny default benchmarks at a small size; real checkpoints: BENCH_ARGS="--size 1024x1024 --steps 50"
BENCH_ARGS ?= --size 256x256 --steps 10 --warmup 1 --runs 5 --baseline diffusers

# The playground's browser test drives Debian's Chromium (playwright downloads no browser here)
CHROMIUM   ?= /usr/bin/chromium
SUDO       := $(if $(filter 0,$(shell id -u)),,sudo)

BIN    := $(VENV)/bin
KT     := $(BIN)/kolors-trt
STAMP  := $(VENV)/.installed-$(shell echo "$(TORCH_SPEC) $(EXTRAS)" | cksum | cut -d' ' -f1)

ifeq ($(strip $(WEIGHTS)),)
  W_DIR  := $(OUT)/tiny/kolors
  IP_DIR := $(OUT)/tiny/ip
  NEED_TINY := $(OUT)/tiny/ip/ip_adapter_plus_general.bin
else
  W_DIR  := $(WEIGHTS)
  IP_DIR := $(IP_ADAPTER)
  NEED_TINY :=
endif

.PHONY: setup browser engines onnx test bench serve serve-ray clean help fullsize-check gpu-check

help:
	@echo "make engines   checkpoint (WEIGHTS, IP_ADAPTER; tiny default) -> $(OUT)/onnx -> $(OUT)/engines"
	@echo "make test      run the test suite (CPU; installs Chromium with apt-get when missing)"
	@echo "make bench     latency benchmark on $(OUT)/onnx (tiny default, ONNX Runtime) against diffusers"
	@echo "make serve     serve $(OUT)/onnx (tiny default, exported if missing) on http://127.0.0.1:8000 (SERVE_ARGS)"
	@echo "make serve-ray the same as $(REPLICAS) Ray Serve replicas on a local Ray instance (REPLICAS, SERVE_ARGS)"
	@echo "make bench-gpu GPU hosts: TensorRT engines at 1024x1024, 50 steps, with/without CUDA graphs, vs diffusers"
	@echo "make gpu-check GPU hosts, < 8 min: the gpu tests and the benchmark at 1024x1024 -> $(GPU_OUT)/check/gpu-check.json (ENGINES=dir)"
	@echo "make fullsize-check  random weights at the real Kolors sizes -> export, validate, build; measured (FULLSIZE_DIR, ~60 GB)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

$(OUT)/tiny/ip/ip_adapter_plus_general.bin: | $(STAMP)
	$(KT) tiny $(OUT)/tiny

onnx: $(STAMP) $(NEED_TINY)
	@test -n "$(IP_DIR)" || (echo "WEIGHTS is set: set IP_ADAPTER to the Kolors-IP-Adapter-Plus folder too" && exit 2)
	$(KT) export --weights "$(W_DIR)" --ip-adapter "$(IP_DIR)" --out $(OUT)/onnx --precision $(PRECISION) $(EXPORT_ARGS)

engines: onnx
	$(KT) build --onnx $(OUT)/onnx --out $(OUT)/engines $(if $(TARGET),--target $(TARGET)) $(BUILD_ARGS)

browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

test: $(STAMP) | $(CHROMIUM)
	KOLORS_TRT_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: onnx
	$(KT) bench --onnx $(OUT)/onnx $(BENCH_ARGS) --json $(OUT)/bench.json --plot $(OUT)/bench.png

# OpenAI's Images API on 127.0.0.1:8000; SERVE_ARGS e.g. "--port 8080 --api-key-file key.txt"
SERVE_ARGS ?=

serve: $(STAMP)
	@test -f $(OUT)/onnx/manifest.json || $(MAKE) onnx
	$(KT) serve --onnx $(OUT)/onnx $(SERVE_ARGS)

# Ray Serve replicas of the same server; Ray's state lives in a temporary folder removed on exit
REPLICAS ?= 2

serve-ray: $(STAMP)
	@test -f $(OUT)/onnx/manifest.json || $(MAKE) onnx
	$(KT) serve --ray --replicas $(REPLICAS) --onnx $(OUT)/onnx $(SERVE_ARGS)

# Not part of `make test`: writes ~19 GB of random fp16 weights at the real sizes into
# FULLSIZE_DIR, then exports, validates and builds each component in its own process
# and writes FULLSIZE_DIR/fullsize-check.{md,json} (seconds, peak RSS, bytes, errors).
FULLSIZE_DIR  ?= $(OUT)/fullsize
FULLSIZE_ARGS ?=

fullsize-check: $(STAMP)
	nice -n 19 $(BIN)/python -m kolors_trt.export.fullsize_check check --out $(FULLSIZE_DIR) $(FULLSIZE_ARGS)

clean:
	rm -rf $(OUT)

# GPU hosts (NVIDIA GPU, data-center TensorRT): the benchmark recipe at the reference
# settings, 1024x1024 and 50 steps. With WEIGHTS/IP_ADAPTER it uses the real checkpoint;
# without, random weights at the real sizes (compute does not depend on weight values).
#   make setup TORCH_SPEC=torch EXTRAS=export,test,tensorrt,bench    # CUDA torch + TensorRT
#   make bench-gpu WEIGHTS=/models/Kolors-diffusers IP_ADAPTER=/models/Kolors-IP-Adapter-Plus
GPU_OUT    ?= $(OUT)/gpu
GPU_RUNS   ?= --warmup 2 --runs 10
ifeq ($(strip $(WEIGHTS)),)
  GPU_W  := $(GPU_OUT)/weights/kolors
  GPU_IP := $(GPU_OUT)/weights/ip
else
  GPU_W  := $(WEIGHTS)
  GPU_IP := $(IP_ADAPTER)
endif

.PHONY: bench-gpu
bench-gpu: $(STAMP)
	test -n "$(strip $(WEIGHTS))" || test -f $(GPU_W)/model_index.json || $(KT) tiny --full-size $(GPU_OUT)/weights
	$(KT) export --weights "$(GPU_W)" --ip-adapter "$(GPU_IP)" --out $(GPU_OUT)/onnx
	$(KT) build --onnx $(GPU_OUT)/onnx --out $(GPU_OUT)/engines-static --target tensorrt --static --size 1024x1024 --batch 1:1:1
	$(KT) build --onnx $(GPU_OUT)/onnx --out $(GPU_OUT)/engines-dynamic --target tensorrt
	$(KT) bench --engines $(GPU_OUT)/engines-static --size 1024x1024 --steps 50 $(GPU_RUNS) --cuda-graph on \
		--baseline diffusers --json $(GPU_OUT)/bench-static-graphs.json --plot $(GPU_OUT)/bench-static-graphs.png
	$(KT) bench --engines $(GPU_OUT)/engines-static --size 1024x1024 --steps 50 $(GPU_RUNS) --cuda-graph off \
		--json $(GPU_OUT)/bench-static.json --plot $(GPU_OUT)/bench-static.png
	$(KT) bench --engines $(GPU_OUT)/engines-dynamic --size 1024x1024 --steps 50 $(GPU_RUNS) \
		--json $(GPU_OUT)/bench-dynamic.json --plot $(GPU_OUT)/bench-dynamic.png

# GPU hosts: one run (at most GPU_CHECK_BUDGET seconds) that answers what the CPU-only machine could not:
# the `gpu` tests (TensorRT and TensorRT-RTX backends against ONNX Runtime, CUDA graphs, the runtime cache)
# and the benchmark at 1024x1024, 50 steps, with and without CUDA graphs, on ENGINES (e.g. the real model's
# static folder from bench-gpu) or else on the tiny checkpoint built here. One report: $(GPU_OUT)/check/gpu-check.json
#   make setup TORCH_SPEC=torch EXTRAS=export,test,tensorrt,tensorrt-rtx,bench
#   make gpu-check [ENGINES=out/gpu/engines-static]
ENGINES          ?=
GPU_CHECK_BUDGET ?= 480

gpu-check: $(STAMP)
	$(BIN)/python -m kolors_trt.gpu_check --out $(GPU_OUT)/check --budget-s $(GPU_CHECK_BUDGET) $(if $(ENGINES),--engines $(ENGINES))
