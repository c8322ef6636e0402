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
EXTRAS     ?= export,test,tensorrt-rtx,bench
OUT        ?= out
WEIGHTS    ?=
IP_ADAPTER ?=
PRECISION  ?= fp16
TARGET     ?=
BUILD_ARGS ?=
PYTEST_ARGS ?= -n 2

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

.PHONY: setup engines onnx test bench clean help

help:
	@echo "make engines   checkpoint (WEIGHTS, IP_ADAPTER; tiny default) -> $(OUT)/onnx -> $(OUT)/engines"
	@echo "make test      run the test suite (CPU)"
	@echo "make bench     latency benchmark on $(OUT)/onnx (tiny default, ONNX Runtime)"

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
	$(KT) export --weights "$(W_DIR)" --ip-adapter "$(IP_DIR)" --out $(OUT)/onnx --precision $(PRECISION)

engines: onnx
	$(KT) build --onnx $(OUT)/onnx --out $(OUT)/engines $(if $(TARGET),--target $(TARGET)) $(BUILD_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: onnx
	$(KT) bench --onnx $(OUT)/onnx --json $(OUT)/bench.json --plot $(OUT)/bench.png

clean:
	rm -rf $(OUT)
