"""One rank of the distributed tests (started by tests/test_distributed.py with torchrun's environment):
quantizes / trains / evaluates a tiny model the way the one-process run in the test does, rank 0 writing.

    python tests/dist_worker.py CKPT OUT_DIR [--kill-rank R --kill-layer L] [--resume]
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)

import llmquant  # noqa: E402
from llmquant.flows import distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from dist_cases import CASES, calib, qat_run  # noqa: E402


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    kill = "--kill-layer" in sys.argv
    if kill and os.environ.get("RANK") == sys.argv[sys.argv.index("--kill-rank") + 1]:
        import llmquant.flows.pipeline as P

        layer = f".{sys.argv[sys.argv.index('--kill-layer') + 1]}"
        run_block = P.run_block

        def dying(stages, ctx):
            if ctx.prefix.endswith(layer):
                os.kill(os.getpid(), 9)
            return run_block(stages, ctx)

        P.run_block = dying
    distributed.init()
    if "--qat-kill" in sys.argv:  # rank 1 dies right after the step-2 checkpoint of a 4-step QAT run
        from llmquant.flows import qat_train

        save = qat_train._save

        def dying(folder, model, opt, done, *a):
            path = save(folder, model, opt, done, *a)
            if done == 2 and os.environ.get("RANK") == "1":
                os.kill(os.getpid(), 9)
            return path

        qat_train._save = dying
        qat_run(ckpt, steps=4, checkpoint_dir=out, checkpoint_every=2, shard="--shard" in sys.argv)
        return
    if "--qat-fsdp" in sys.argv:  # four QAT steps sharded with FSDP2, a checkpoint every two (step 2's kept)
        import shutil

        from llmquant.flows import qat_train

        save = qat_train._save

        def keeping(folder, model, opt, done, *a):
            path = save(folder, model, opt, done, *a)
            if done == 2 and distributed.is_writer():
                os.makedirs(os.path.join(out, "step2"))
                shutil.copy(path, os.path.join(out, "step2", os.path.basename(path)))
            return path

        qat_train._save = keeping
        losses, state = qat_run(ckpt, steps=4, shard=True, checkpoint_dir=out, checkpoint_every=2)
        qat_train._save = save
        # sharded again, resuming step 2's checkpoint (the optimizer state loaded into the shards)
        if distributed.is_writer():
            shutil.copytree(os.path.join(out, "step2"), os.path.join(out, "step2-sharded"))
        distributed.active().check("the copied checkpoint")
        resumed, rstate = qat_run(ckpt, steps=4, shard=True, checkpoint_dir=os.path.join(out, "step2-sharded"),
                                  resume=True)
        if distributed.is_writer():
            torch.save({"losses": losses, "state": state, "resumed": resumed, "resumed_state": rstate},
                       os.path.join(out, "qat_fsdp.pt"))
        return
    if "--qat-shard-load" in sys.argv:
        qat_shard_load(ckpt, out)
        return
    cases = ["gptq"] if kill or "--resume" in sys.argv else list(CASES)
    for name in cases:
        m, _ = llmquant.load_model(ckpt)
        llmquant.quantize(m, CASES[name], calib=calib(), progress=False, output=os.path.join(out, name),
                          resume="--resume" in sys.argv)
    if kill or "--resume" in sys.argv:
        return
    losses, state = qat_run(ckpt)
    m, tok = llmquant.load_model(ckpt)
    ref, _ = llmquant.load_model(ckpt)
    llmquant.quantize(m, "W3G32", progress=False)
    ev = llmquant.evaluate(m, reference=ref, tokenizer=tok, windows=3, seq_len=32, progress=False).to_dict()
    sens = sensitivities(ref)
    if distributed.is_writer():
        torch.save({"losses": losses, "state": state, "eval": ev, "sens": sens}, os.path.join(out, "qat_eval.pt"))
        with open(os.path.join(out, "done.json"), "w") as f:
            json.dump({"world": distributed.active().world}, f)


def qat_shard_load(ckpt, out) -> None:
    """Sharded QAT (four steps, a checkpoint every two) on the model loaded whole then sharded, and on the
    model loaded sharded (each rank reading its own rows; what each rank holds after the read recorded;
    only the writer gathering the trained model: the others' left empty, None), then resumed, loaded
    sharded, from the latter's step-2 checkpoint."""
    import shutil

    from torch.distributed.tensor import DTensor

    from llmquant import QuantScheme
    from llmquant.flows import fsdp, qat_train

    save, fill = qat_train._save, fsdp.fill
    held = {}

    def keeping(folder, model, opt, done, *a):
        path = save(folder, model, opt, done, *a)
        if done == 2 and distributed.is_writer():
            shutil.copytree(folder, f"{folder}-step2")
        return path

    def recording(model, teacher, source):  # each parameter's shard right after the read
        fill(model, teacher, source)
        for who, m in (("student", model), ("teacher", teacher)):
            for n, p in m.named_parameters():
                held[f"{who}.{n}"] = (type(p).__name__, tuple(p.shape), p.to_local().numel() if isinstance(p, DTensor)
                                      else p.numel(), p.is_meta)

    qat_train._save, fsdp.fill = keeping, recording
    runs = {}
    for tag, lazy in (("whole", False), ("sharded", True)):  # loaded sharded: only the writer gathers it whole
        runs[tag] = qat_run(ckpt, steps=4, load_sharded=lazy, shard=True, checkpoint_dir=os.path.join(out, tag),
                            checkpoint_every=2, save=os.path.join(out, f"{tag}-out"), keep_whole=not lazy)
        runs[tag] = runs[tag][0], {k: None if v.is_meta else v for k, v in runs[tag][1].items()}
    qat_train._save = save
    distributed.active().check("the copied checkpoint")
    runs["resumed"] = qat_run(ckpt, steps=4, load_sharded=True, shard=True, resume=True,
                              checkpoint_dir=os.path.join(out, "sharded-step2"), save=os.path.join(out, "resumed-out"))
    # frozen asymmetric step sizes (whole on every rank: computed from each linear's weight gathered whole)
    frozen = dict(steps=2, shard=True, config=QuantScheme(bits=4, group_size=32, symmetric=False), learn_scales=False)
    runs["frozen-whole"], runs["frozen-sharded"] = (qat_run(ckpt, load_sharded=lazy, **frozen) for lazy in (False, True))
    torch.save({"runs": runs, "held": held, "rank": distributed.active().rank},
               os.path.join(out, f"qat_shard_load.{distributed.active().rank}.pt"))


# QAT candidates: two steps on the 96 tokens before the windows, each batch of 2 split over the 2 ranks
QAT_KNOBS = {"steps": 2, "seq_len": 16, "batch": 2, "lr": 1e-4}


def sensitivities(model) -> dict:
    """Each sensitivity measure's damages on 3 windows of 32 tokens (the test makes the same in one process)."""
    ids = calib().flatten()
    return {(meth, q): llmquant.sensitivity(model, ids, ("W8", "W4G32", "W2G32"), method=meth, quantizer=q, windows=3,
                                            seq_len=32, cache=False, progress=False,
                                            params=QAT_KNOBS if q == "qat" else None).damage
            for meth, q in (("fisher", "rtn"), ("kfac", "rtn"), ("kfac", "gptq"), ("kfac", "awq"), ("kl", "rtn"),
                            ("kfac", "qat"))}


if __name__ == "__main__":
    main()
