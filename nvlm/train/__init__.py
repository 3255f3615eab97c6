"""Fine-tuning NVLM-D.

- `data.py`: JSONL records -> tokenized `Sample`s with loss labels (SPEC §5 masking) -> padded or packed
  `Batch`es, and a deterministic, resumable weighted `Blend` of datasets.
- `config.py`, `trainer.py`, `distributed.py`, `checkpoint.py`, `lora.py`, `cli.py`: the run configuration, the
  training loop, FSDP2 sharding, resumable checkpoints, LoRA and `nvlm train`; `synthetic.py`: a toy data set.
"""
