# Two commands on a fresh machine with python3 + pip: `make train` and `make test`.
# uv installs the locked registry torch + torchvision pair into .venv (pip's local CPU torch is not used).
UV := python3 -m uv
RUN := $(UV) run --frozen
# Python writes each module's bytecode on its first import, so the install leaves it to the imports (15,000 files,
# 17 s on 2 cores, of which a run imports a fraction). Where Python may not write it (PYTHONDONTWRITEBYTECODE set),
# the install compiles everything: else each interpreter would compile torch and Lightning again (8 s per start).
COMPILE := $(if $(PYTHONDONTWRITEBYTECODE),--compile-bytecode)

.PHONY: setup train test test-all lint bench gpu-check tensorboard

setup: .venv/.synced

.venv/.synced: pyproject.toml uv.lock
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
		|| python3 -m pip install --quiet --user --break-system-packages uv
	$(UV) sync --frozen --all-extras $(COMPILE)
	@touch $@

train: setup
	$(RUN) python train.py fit --config configs/digits.yaml

# --dist loadfile: a file's module fixtures (trained checkpoints, exports) are built once, not once per worker.
test: setup
	$(RUN) pytest -m "not slow" -n auto --dist loadfile -q --durations=15

test-all: setup
	$(RUN) pytest -n auto -q --durations=15

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

bench: setup
	$(RUN) python benchmarks/run.py

gpu-check: setup
	$(RUN) python benchmarks/gpu_check.py

tensorboard: setup
	$(RUN) tensorboard --logdir lightning_logs --host 127.0.0.1
