PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-slow demo gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[synth,test]'
	touch $(STAMP)

# One single-threaded pytest worker per core (up to 4), whole files per worker so module fixtures are built once.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The distillation demo: embedded dataset -> committed teacher -> no-KD student vs KD-DETR student, trained side by
# side on the demo recipe (7 epochs = 1750 steps, learning rate 4e-4 dropped after epoch 6: chosen on val).
DEMO_DATA ?= data/embedded
DEMO_OUT ?= runs/demo
DEMO_EPOCHS ?= 7
DEMO_DROP ?= 6
DEMO_LR ?= 4e-4
TEACHER ?= assets/teacher

demo: install
	test -f $(DEMO_DATA)/annotations/instances_test.json || \
		{ rm -rf $(DEMO_DATA) && $(BIN)/kddetr data synth --out $(DEMO_DATA) --train 2000 --val 200 --test 500 --size 128 --seed 0; }
	test -f $(TEACHER)/model.safetensors || \
		{ $(BIN)/kddetr train configs/embedded_teacher.yaml --data $(DEMO_DATA) --out runs/teacher && \
		  mkdir -p $(dir $(TEACHER)) && cp -r runs/teacher/last $(TEACHER) && rm -f $(TEACHER)/trainer_state.pt; }
	$(BIN)/kddetr bench kd --demo --data $(DEMO_DATA) --teacher $(TEACHER) --out $(DEMO_OUT) \
		--records $(DEMO_OUT)/records --set train.epochs=$(DEMO_EPOCHS) --set "train.lr_drop_epochs=[$(DEMO_DROP)]" \
		--set train.lr=$(DEMO_LR) --set train.lr_backbone=$(DEMO_LR) --set train.eval_every=2
	$(BIN)/kddetr plot $(DEMO_OUT)/student_no_kd $(DEMO_OUT)/kd_detr_general_specific --out $(DEMO_OUT)/curves.png

# CPU vs GPU parity, AMP train/distill steps, COCO-size KD memory, GPU speed tables, NCCL DDP (<= 10 min on one GPU).
gpu-check: install
	$(BIN)/kddetr bench gpu-check

clean:
	rm -rf $(VENV) build src/*.egg-info runs
