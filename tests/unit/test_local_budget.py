"""`doppel local`'s training budget: the demo's as is, a real export's sized to the cores and the data."""

from pathlib import Path

from doppel.local.settings import CPU_EVAL_SAMPLES, Settings, training_settings


def settings(**kwargs) -> Settings:
    return Settings(workdir=Path("w"), **kwargs)


def test_the_demo_uses_every_sample_over_its_sixteen_steps():
    chosen = training_settings(settings(demo=True), 84, "smollm2-135m", cores=16)
    assert chosen["max_steps"] == 16  # the demo's steps, whatever the cores
    assert "max_train_samples" not in chosen  # 84 samples: whole passes over all of them
    assert (chosen["rank"], chosen["batch_size"] * chosen["grad_accum"], chosen["max_length"]) == (16, 8, 512)
    # Micro-batches of 2 x 512 tokens: 8 x 512 at once took 8.6 GB of activations on CPU.
    assert chosen["batch_size"] == 2


def test_a_large_export_takes_the_newest_samples_its_steps_can():
    two = training_settings(settings(export=Path("x.zip")), 14_000, "smollm2-135m", cores=2, bf16=False)
    # The tokens of 16 steps of 8 samples of 400 tokens, in steps of samples clipped to 320 tokens whose
    # context runs without gradient (140 tokens trained whole, on average): 45 of them.
    assert (two["epochs"], two["max_steps_per_epoch"]) == (1, 45) and two["train_max_length"] == 320
    assert two["max_train_samples"] == 45 * 8 and two["max_eval_samples"] == CPU_EVAL_SAMPLES
    assert two["max_length"] == 512  # what the held-out samples keep
    assert two["max_train_tokens"] == 16 * 8 * 400  # the time: samples costlier on average take fewer steps
    assert two["eval_steps"] == 45  # one evaluation, at the end: the held-out set chooses no checkpoint
    # Many varied samples, each seen once, learn at a higher rate than the demo's few, seen again and again.
    assert two["lr"] > training_settings(settings(demo=True), 84, "smollm2-135m", cores=2)["lr"]
    # The replies alone are backpropagated, 8 samples a step in micro-batches of 4 of similar reply length.
    assert two["context_gradient"] is False and "context_weight" not in two
    assert (two["batch_size"], two["grad_accum"]) == (4, 2)
    eight = training_settings(settings(export=Path("x.zip")), 14_000, "smollm2-135m", cores=8, bf16=False)
    assert eight["max_steps_per_epoch"] == 182 and eight["max_train_samples"] == 182 * 8
    asked = training_settings(settings(export=Path("x.zip"), max_steps=10), 14_000, "smollm2-135m", cores=2)
    assert asked["max_steps_per_epoch"] == 10 and asked["max_train_samples"] == 80
    assert asked["context_weight"] == 0.25  # steps asked for train whole samples, as many as asked


def test_a_cpu_that_computes_bfloat16_takes_a_quarter_more_steps():
    fast = training_settings(settings(export=Path("x.zip")), 14_000, "smollm2-135m", cores=2, bf16=True)
    assert fast["cpu_bf16"] is True and fast["max_steps_per_epoch"] == 57 and fast["max_train_samples"] == 456
    assert fast["eval_steps"] == 57
    # The budget's time in tokens: 20 steps of 8 samples of 400 on average.
    assert fast["max_train_tokens"] == 20 * 8 * 400
    plain = training_settings(settings(export=Path("x.zip")), 14_000, "smollm2-135m", cores=2, bf16=False)
    assert plain["cpu_bf16"] is False  # named in the settings: the adapter's fingerprint tells them apart
    # The demo keeps its sixteen steps: faster, not longer.
    demo = training_settings(settings(demo=True), 84, "smollm2-135m", cores=2, bf16=True)
    assert demo["max_steps"] == 16 and "context_weight" not in demo
    assert "max_train_tokens" not in demo and "context_gradient" not in demo


def test_a_person_of_few_samples_is_passed_over_three_times_at_most():
    few = training_settings(settings(export=Path("x.zip")), 26, "smollm2-135m", cores=2, bf16=True)
    # 26 samples, 2 steps of 8 an epoch (the held-out ones aside): 6 steps, not the budget's 27.
    assert few["max_steps"] == 6 and few["eval_steps"] == 6 and "max_train_samples" not in few
    assert few["max_train_tokens"] == 6 * 8 * 320
    # Whole samples, the context learnt at a quarter weight: passes over the replies alone would learn them
    # by heart.
    assert few["context_weight"] == 0.25 and "context_gradient" not in few
    many = training_settings(settings(export=Path("x.zip")), 120, "smollm2-135m", cores=2, bf16=True)
    assert many["max_steps"] == 27 and many["context_weight"] == 0.25
    # Steps the user asked for are theirs.
    asked = training_settings(settings(export=Path("x.zip"), max_steps=12), 26, "smollm2-135m", cores=2)
    assert asked["max_steps"] == 12


def test_more_steps_than_a_pass_go_over_every_sample_before_any_again():
    # 500 samples hold about 53 steps of 8 after the held-out cut: 54 asked are every sample once, not a
    # random half of them twice.
    asked = training_settings(settings(export=Path("x.zip"), max_steps=54), 500, "smollm2-135m", cores=2)
    assert asked["max_steps"] == 54 and "epochs" not in asked
    assert asked["max_train_samples"] == 54 * 8  # more than the 425 or so before the cut: all of them
    # Between the bound on a pass and a true pass: the newest, most characteristic samples 50 steps hold,
    # not a random 400 of the first pass.
    near = training_settings(settings(export=Path("x.zip"), max_steps=50), 500, "smollm2-135m", cores=2)
    assert near["max_steps"] == 50 and near["max_train_samples"] == 400
    # Fewer steps than a pass holds: one pass over the samples they can take.
    within = training_settings(settings(export=Path("x.zip"), max_steps=40), 500, "smollm2-135m", cores=2)
    assert (within["epochs"], within["max_steps_per_epoch"], within["max_train_samples"]) == (1, 40, 320)


def test_a_base_model_without_a_budget_gets_the_trainers_defaults():
    assert training_settings(settings(export=Path("x.zip")), 500, "/models/mistral-7b", cores=2) == {}


def test_on_a_gpu_a_real_export_has_no_budget_but_the_built_in_model_s_rate(monkeypatch):
    """With a GPU, `doppel local` trains with `doppel train`'s recipe, at SmolLM2's own rate as it would."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = training_settings(settings(export=Path("x.zip")), 14_000, "smollm2-135m", cores=2)
    assert chosen == {"lr": 3e-3}
    assert "lr" not in training_settings(settings(export=Path("x.zip")), 14_000, "/models/qwen", cores=2)


def test_the_replies_alone_are_learnt_once_at_most():
    # 324 samples (hyperledger's thojest): the budget's 57 steps of replies alone would pass over his 273 or
    # so training samples nearly twice; one pass at most (the trainer stops at its end), time left unspent.
    mid = training_settings(settings(export=Path("x.zip")), 324, "smollm2-135m", cores=2, bf16=True)
    assert mid["context_gradient"] is False
    assert (mid["epochs"], mid["max_steps_per_epoch"]) == (1, 57) and "max_steps" not in mid
    # Whole samples, the context learnt too, may still pass over a person's few samples again.
    few = training_settings(settings(export=Path("x.zip")), 120, "smollm2-135m", cores=2, bf16=True)
    assert few["max_steps"] == 27 and "context_gradient" not in few
