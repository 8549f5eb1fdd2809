# The README's commands: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data

.PHONY: demo test test-numeric lint data reproduce sweep torch-floor

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Fashion-MNIST: Debian's dataset-fashion-mnist when apt can install it, else torchvision's downloader.
data: $(VENV)/.installed
	@test -d /usr/share/datasets/fashion-mnist || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }); } || true
	$(PY) -m utils.data --prepare fashion-mnist --root $(DATA)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The tests that compare numbers (fixtures, trajectories, kernels, the stages' steps): CI runs them
# a second time under another CPU's float noise (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS).
NUMERIC_TESTS := $(addprefix tests/test_,$(addsuffix .py,mobilenet_v2 resnet variants quantizers native pieces dataparallel \
  trajectories mutations ties training stage1 stage3))
test-numeric: $(VENV)/.installed
	$(PY) -m pytest -q $(NUMERIC_TESTS)

# requirements.txt's oldest torch runs the project (tests/torch_floor.py): a virtual environment of its
# own with exactly that release; every module imported, stage 1 one step per phase.
FLOOR_VENV := .venv-floor
torch-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q -r requirements.txt "torch==2.5.1" "torchvision==0.20.1"
	$(FLOOR_VENV)/bin/python -m tests.torch_floor

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The demo preset: flags of the same scripts a user runs (README, "The demo").
DEMO := demo
# The default --replicas 8: each batch of 128 as the reference's eight devices' pieces of 16, in one pass.
DEMO_MODEL := --width_multiplier 0.5 --width_divisor 8 --base_resolution 32 --min_crop_scale 0.5 -j 2
DEMO_ITERS := 400
DEMO_SUPERNET := $(DEMO)/train-supernet/model_actwbin_best_$(shell printf %05d $(DEMO_ITERS))it.pth
DEMO_FOLDS := --k 10

demo: data
	@test -f $(DEMO)/teacher.pth || $(PY) -m training.teacher --data fashion-mnist --arch resnet18 \
	  --epochs 1 --max_iters 300 --lr 0.05 --min_crop_scale 0.5 --out $(DEMO)/teacher.pth
	$(PY) 01train_supernet.py --data fashion-mnist $(DEMO_MODEL) --teacher $(DEMO)/teacher.pth \
	  --batch_size 128 --abin_total_iters $(DEMO_ITERS) --awbin_total_iters $(DEMO_ITERS) \
	  --learning_rate_abin 2e-3 --learning_rate_wbin 2e-3 --save_interval 1000 --report_freq 50 \
	  --save $(DEMO)/train-supernet
	$(PY) 02kfold_evolution.py --data fashion-mnist $(DEMO_MODEL) --supernet $(DEMO_SUPERNET) \
	  $(DEMO_FOLDS) --folds 0,1 --population-num 8 --select-num 4 --mutation-num 3 --crossover-num 3 \
	  --max-epochs 3 --bn_recalibration_batches 4 --save $(DEMO)/eval-kfold-evolution
	$(PY) 03finetune.py --data fashion-mnist $(DEMO_MODEL) --supernet $(DEMO_SUPERNET) $(DEMO_FOLDS) \
	  --search-result $(DEMO)/eval-kfold-evolution/search_result.json --bn_epochs 1 \
	  --iters_per_epoch 30 --batch_size 128 --save $(DEMO)/eval-blast
	$(PY) 04export.py --checkpoint $(DEMO)/eval-blast/arch0_model_actwbin_2_2_bn_0ep.pth --data fashion-mnist \
	  -j 2 --out $(DEMO)/export
	@echo "demo outputs: teacher $(DEMO)/teacher.pth; supernet checkpoints, log.txt and TensorBoard in" \
	  "$(DEMO)/train-supernet; search in $(DEMO)/eval-kfold-evolution; fine-tuned archs and" \
	  "final_result.json in $(DEMO)/eval-blast; the first arch exported in $(DEMO)/export"

# The Fashion-MNIST reproduction (README, "Results"): about 70 minutes on 2 cores; QUICK=1 for a
# smoke check. Finished steps are kept under runs/reproduce: a rerun continues where it stopped.
reproduce: data
	$(PY) reproduce.py $(if $(QUICK),--quick)

# The budget sweep (README, "Results"): MobileNet-v2 x0.5, 2 bits, the table's methods at four stage-1
# budgets; hours on 2 cores. The same cached, resumable steps, under runs/reproduce/sweep.
sweep: data
	$(PY) reproduce.py --sweep
