"""The command line of a short GRPO run on the tiny model, shared by the run-folder and resume tests."""


def train_args(tiny_model_dir, digits_jsonl, out, *extra, completion_tokens=4):
    """`visual-rft train` arguments: 2 steps of 1 prompt x G=2, a checkpoint every step; `extra` appended."""
    return ["train", "configs/demo.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}",
            f"output.dir={out}", "grpo.max_steps=2", "grpo.num_generations=2", "grpo.per_device_batch_size=1",
            f"grpo.max_completion_length={completion_tokens}", "output.progress=false", "output.save_steps=1", *extra]
