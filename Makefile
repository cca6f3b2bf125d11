# Everything the project needs is installed from here, on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
EXTRAS ?= test

.PHONY: install test test-fast demo clean faceapi

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# MTCNN weights ship in facenet-pytorch's wheel; its pins would replace torch, so no deps.
	$(PIP) install --quiet --no-deps "facenet-pytorch==2.6.0"
	# DeepSpeed ships an sdist whose build imports torch: build it against the torch above.
	$(PIP) install --quiet --no-build-isolation "deepspeed==0.19.*"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	WANDB_MODE=offline $(PY) -m s2f demo

# Two workers: the Slurm and subprocess tests spend most of their time waiting.
test: install
	WANDB_MODE=offline $(PY) -m pytest -n 2 --dist loadfile --durations=15

test-fast: install
	WANDB_MODE=offline $(PY) -m pytest -m "not slow and not slurm"

# face-api's AgeGenderNet weights (MIT) and the node runtime for the cross-check, into .cache/faceapi.
faceapi:
	bash scripts/fetch-faceapi.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
