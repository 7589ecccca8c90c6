"""A Hugging Face Trainer script as a decentralized DECA run: the example of ``deca_ds.hf``.

    deepspeed --num_gpus 4 recipes/hf_trainer.py --deepspeed ds_configs/hf_auto.json --output_dir runs/hf
    torchrun --nproc_per_node 4 recipes/hf_trainer.py --output_dir runs/hf --max_steps 100
    deepspeed --num_gpus 8 recipes/hf_trainer.py --deepspeed ds.json --learning_rate 2e-5 \\
        model.path=/models/Qwen2.5-0.5B-Instruct model.dtype=bf16 data.path=/data/alpaca.jsonl topology.name=exponential

``--flags`` are ``TrainingArguments``; ``key=value`` items and ``--deca_config recipes/configs/X.yaml`` are deca_ds
settings (model, data, method, blocks, topology, clients, deca, gossip, and optim.schedule/warm-up/epochs, which
become the Trainer's own --lr_scheduler_type/--warmup_steps/--num_train_epochs). Without flags the Trainer gets the
recipe's settings (learning rate, steps, seed, micro-batch 8, the recipe's schedule, clipping 1.0), so
``recipes/finetune.py`` and this script compute the same losses (tests/integration/test_hf_trainer.py).
What differs from an ordinary Trainer script is marked DECA.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def recipe_defaults(cfg) -> list[str]:
    """TrainingArguments flags that give the recipe's settings (any flag given later on the command line wins):
    ``optim.schedule``, ``optim.warmup_*`` and ``epochs`` become the Trainer's ``--lr_scheduler_type``, warm-up and
    ``--num_train_epochs`` (deca_ds.hf.schedule_arguments), so the Trainer's own scheduler runs the recipe's
    schedule."""
    from deca_ds.hf import schedule_arguments

    o = cfg.optim
    flags = ["--output_dir", cfg.output_dir, "--seed", str(cfg.seed),
             "--learning_rate", str(o.lr), "--adam_beta1", str(o.betas[0]), "--adam_beta2", str(o.betas[1]),
             "--adam_epsilon", str(o.eps), "--weight_decay", str(o.weight_decay), "--per_device_train_batch_size", "8",
             "--max_grad_norm", "1.0", "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none"]
    for key, value in schedule_arguments(cfg).items():
        flags += [f"--{key}", str(value)]
    return flags


def main(argv=None) -> int:
    from transformers import HfArgumentParser, TrainingArguments

    from deca_ds.config import ConfigError
    from deca_ds.hf import DataCollator, DecaSettings, DecaTrainer, finish_distributed, init_distributed
    from deca_ds.models import load_model_and_tokenizer

    argv = sys.argv[1:] if argv is None else argv
    try:
        deca, rest = DecaSettings.from_argv(argv)  # DECA: key=value settings and --deca_config
        init_distributed(deca.config.comm_timeout)  # DECA (optional): start the process group the launcher's way
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            recipe_defaults(deca.config) + rest)
        model, tokenizer = load_model_and_tokenizer(deca.config.model, seed=args.seed)
        data = deca.client_data(tokenizer)  # DECA: this client's partition (or load the client's own rows here)
        trainer = DecaTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer,
                              data_collator=DataCollator(tokenizer.pad_token_id), deca=deca)  # DECA
        resume = args.resume_from_checkpoint
        trainer.train(resume_from_checkpoint=True if resume in ("True", "true") else resume or None)
        trainer.save_consensus_model()  # DECA: the average of all clients, a Hugging Face model directory
        finish_distributed()  # DECA: leave the process group on every rank (see its docstring)
    except ConfigError as e:
        print(f"deca_ds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
