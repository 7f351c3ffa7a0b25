# Fresh machine: `make train` or `make test` creates .venv, installs, finds FashionMNIST, runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_DATA := /usr/share/datasets/fashion-mnist

.PHONY: train test lint data postgresql bench results check-results tensorboard clean

train: $(VENV)/.installed data
	$(PY) -m fashion_lightning fit --config configs/sgd.yaml

test: $(VENV)/.installed data postgresql lint
	$(PY) -m pytest

# The runs' curves: TensorBoard, with the links to the project's views printed last.
tensorboard: $(VENV)/.installed
	$(PY) -m fashion_lightning.board --logdir lightning_logs

# Epoch time of the tutorial's loop, the bare-PyTorch floor and this project (minutes).
bench: $(VENV)/.installed data
	$(PY) benchmarks/epoch_time.py --epochs 3 --repeats 3

# Test accuracy of every config over 3 seeds, as the README's table (about 15 minutes).
results: $(VENV)/.installed data
	$(PY) benchmarks/results.py

# The README's seed-42 results of the quick configs (sgd, adam, rmsprop, fast), rerun and
# compared (about 4 minutes).
check-results: $(VENV)/.installed data
	$(PY) benchmarks/results.py --check

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Debian's dataset-fashion-mnist is the offline source of the data (root installs it here);
# without it the project falls back to torchvision's download and then to a clear error.
data:
	@test -f $(DEBIAN_DATA)/train-images-idx3-ubyte.gz || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# The search's tests start a PostgreSQL server of their own (Debian's package; root installs it).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq postgresql; }

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,tune,export]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
