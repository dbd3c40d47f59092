"""Pretraining entry point, run under the DeepSpeed launcher (see ../launch.sh):

    deepspeed --num_gpus 8 pretrain/train.py --config pretrain/configs/demo.yaml train.max_steps=200

or as one plain process (world size 1), for debugging and tests:

    python -m pretrain.train --config pretrain/configs/demo.yaml train.max_steps=20 train.warmup_steps=2

The run directory (`run.dir`) receives the resolved config, `metrics.jsonl`, checkpoints, wandb's
offline files, `loss.png` and, when training completes, `summary.json`. A run stopped by
non-finite steps (pretrain/step_guard.py) writes `summary.json` with `"finished": false` and why,
and exits 3. Under `srun` (one task per GPU) ranks come from SLURM_* (pretrain/launch/slurm.py).
Started again in the same directory, a run resumes from its newest complete checkpoint (weights,
optimizer, schedule, data position, RNG) and continues exactly as if it had not stopped; on another
number of ranks or expert-parallel size the state is resharded (pretrain/checkpoint/start.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the DeepSpeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import ConfigError, RunConfig, load_config, save_config
from pretrain.data.stats import StatsAccumulator
from pretrain.accounting import paper_flops, param_counts, training_flops
from pretrain.ds_config import build_ds_config, resolve_precision
from pretrain.loss_norm import LossMeter, count_targets, forward_backward
from pretrain.evaluation import caption_word_accuracy, evaluate_sources
from pretrain.metrics import MetricsLogger, plot_losses
from pretrain.ops_metrics import DataWait, window_metrics
from pretrain.step_guard import StepGuard, nonfinite_state_stop, state_is_finite
from pretrain.optim import base_lr, build_optimizer, param_groups
from pretrain.schedule import lr_multiplier


def wandb_run_id(name: str, run_dir: Path) -> str:
    """Stable across restarts (so a resumed run continues the same wandb run), unique per directory."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (or make a world of one)."""
    import deepspeed

    if "RANK" not in os.environ:  # a task started by srun: ranks and rendezvous from SLURM_*
        from pretrain.launch.slurm import torch_env_from_slurm
        os.environ.update(torch_env_from_slurm(dict(os.environ)))
    if "RANK" not in os.environ:  # plain `python -m pretrain.train`
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        local_rank %= torch.cuda.device_count()  # srun --gpus-per-task=1 shows each task one GPU
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # DeepSpeed's CPU comm op leaves a ~69 MB /dev/shm file per rank behind: remove ours at exit.
        from pretrain.launch.shm_buffers import release_at_exit
        release_at_exit(dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), device


def _write_resolved_config(cfg: RunConfig, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml
        old = yaml.safe_load(path.read_text())
        new = cfg.to_dict()
        changed = [f"{s}.{k}" for s in new for k in new[s]
                   if isinstance(old, dict) and old.get(s, {}).get(k) != new[s][k]]
        if changed:
            print(f"[train] warning: config changed since this run started: {', '.join(changed)}; "
                  f"the old one is kept as config.prev.yaml", flush=True)
            path.replace(run_dir / "config.prev.yaml")
    save_config(cfg, path)


def build_eval_sets(cfg: RunConfig, rank: int, world: int) -> dict:
    from pretrain.data.loader import build_eval_batches
    from pretrain.data.shards import load_manifest

    manifest = load_manifest(cfg.data.root)
    sets = {}
    for source in cfg.data.sources:
        if not manifest.select(source, "val"):
            print(f"[train] warning: no held-out shards for source '{source}'; it is not evaluated",
                  flush=True) if rank == 0 else None
            continue
        sets[source] = build_eval_batches(cfg.data, source, rank=rank, world_size=world,
                                          micro_batch_size=cfg.train.micro_batch_size,
                                          max_batches=cfg.train.eval_batches)
    return sets


def run_image_probe(model, cfg: RunConfig, rank: int, world: int, device) -> dict:
    """Demo check that the model reads pixels: colour/shape word accuracy, real images vs noise."""
    from pretrain.data.corpora.demo import probe_examples
    from pretrain.data.loader import load_tokenizer
    from pretrain.data.packing import Document, pack_documents

    tok = load_tokenizer(cfg.data)
    per_rank = cfg.train.probe_examples // world
    examples = probe_examples(cfg.data.root, "val", per_rank * world)[rank * per_rank:(rank + 1) * per_rank]
    counts = {"image": torch.zeros(3, dtype=torch.float64), "noise": torch.zeros(3, dtype=torch.float64)}
    chunk = max(cfg.train.micro_batch_size, 8)
    for start in range(0, len(examples), chunk):
        docs = [Document("caption", [ex.image, ex.caption]) for ex in examples[start:start + chunk]]
        batch = pack_documents(docs, cfg.data, tok, best_fit=False)
        ids = (tok.boi_id, tok.eoi_id)
        counts["image"] += caption_word_accuracy(model, batch, ids, device).cpu()
        counts["noise"] += caption_word_accuracy(model, batch, ids, device, noise_seed=start + 1).cpu()
    result = {}
    for name, c in counts.items():
        c = c.to(device)
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        n = max(float(c[2]), 1.0)
        result[f"{name}/colour_acc"] = float(c[0]) / n
        result[f"{name}/shape_acc"] = float(c[1]) / n
    result["examples"] = int(c[2])
    from pretrain.data.corpora.demo import COLOURS, SHAPES
    result["chance"] = max(1 / len(COLOURS), 1 / len(SHAPES))
    return result


def run_caption_demo(module, cfg: RunConfig, run_dir: Path, step: int) -> dict:
    """Demo evidence (rank 0): captions of held-out images and CIDEr-D, real images vs noise.
    The model is trained and saved: a failure here is reported, never allowed to fail the run."""
    from pretrain.evaluate.demo_captions import caption_demo, demo_model
    try:
        return caption_demo(demo_model(module, cfg, run_dir, step), cfg.data.root, run_dir)
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"[captions] warning: caption demo failed ({type(e).__name__}: {e})", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}


def run_summary(cfg: RunConfig, step: int, tokens: int, image_tokens: int, last_eval: dict) -> dict:
    """`summary.json`: what tools/collect_runs.py reads for the scaling-law fits.

    `params` is the paper's N (decoder parameters one token goes through, embeddings included;
    active parameters for the MoE), `vision_params` N_v (late fusion's encoder), `tokens` D,
    `vision_tokens` D_v (image patches, which late fusion's encoder processes), `flops` the
    paper's C = 6 (N D + N_v D_v). Counts come from the config (pretrain/accounting.py), so they
    do not depend on how experts are sharded over ranks."""
    counts = param_counts(cfg.model)
    image_tokens_for_encoder = image_tokens if counts.vision_params else 0
    return {"finished": True, "step": step, "kind": cfg.model.kind, "tokens": tokens,
            "params": counts.decoder_params, "active_params": counts.active_params,
            "total_params": counts.params, "vision_params": counts.vision_params,
            "embedding_params": counts.embedding_params, "vision_tokens": image_tokens_for_encoder,
            "image_tokens": image_tokens,
            "flops": paper_flops(counts, tokens, image_tokens_for_encoder), "eval": last_eval}


# Dense bf16 peak of the GPUs people train on, for MFU (the datasheets' figures without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None  # unknown peak (CPU, fp32): MFU is not reported rather than guessed
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _data_stats_over_ranks(acc, device) -> dict:
    """Padding, realised mixture and images per row over the log window, summed over ranks."""
    keys = sorted(acc.totals)
    t = torch.tensor([acc.totals[k] for k in keys] + [acc.batches], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    acc.totals = {k: int(v) for k, v in zip(keys, t[:-1].tolist())}
    acc.batches = int(t[-1])
    summ = acc.summary()
    out = {"data/padding_frac": summ["padding_frac"]}
    for name, d in summ["per_source"].items():
        out[f"data/{name}/row_frac"] = d["row_frac"]
        out[f"data/{name}/token_frac"] = d["token_frac"]
        out[f"data/{name}/images_per_row"] = d["images_per_row"]
    return out


def _sum_over_ranks(values: list[float] | torch.Tensor, device) -> list[float]:
    t = torch.as_tensor(values).to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _stopped(cfg: RunConfig, stop, rank: int, run_dir: Path, guard, logger, summary: dict) -> dict:
    """A run stopped by the non-finite guard: summary.json says so (finished false and why)."""
    summary.update({"finished": False, "stopped": {"reason": stop.kind, "step": stop.step,
                                                   "first_bad_step": stop.first_bad_step,
                                                   "message": stop.message},
                    "skipped_steps": guard.skipped_total})
    if rank == 0:
        print(f"[train] error: {stop.message}", file=sys.stderr, flush=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_losses(run_dir)
    logger.close()
    return summary


def train(cfg: RunConfig) -> dict:
    import deepspeed

    rank, world, device = init_distributed()
    cfg.validate(world)
    cfg.check_environment()
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    from pretrain.data.loader import build_train_loader, load_tokenizer
    from pretrain.models import build_model

    tok = load_tokenizer(cfg.data)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} pieces ({cfg.data.root})")

    torch.manual_seed(cfg.run.seed)
    # MoE: DeepSpeed's expert-parallel groups must exist before the model (its layers register
    # with the engine as deepspeed.moe MoE layers; pretrain/models/moe_parallel.py).
    expert_group = None
    if cfg.model.kind == "moe":
        from pretrain.models.moe_parallel import create_expert_parallel_group
        expert_group = create_expert_parallel_group(cfg.model.moe.expert_parallel_size)
    model = build_model(cfg.model, expert_group=expert_group)
    if cfg.model.vision.init_from:  # a pretrained CLIP / SigLIP vision tower (late fusion)
        from pretrain.models.vision_hf import load_hf_vision
        report = load_hf_vision(model.image_embedder, cfg.model.vision.init_from)
        if rank == 0:
            print(f"[train] model.vision.init_from: {report.summary()}", flush=True)
    counts = param_counts(cfg.model)
    t = cfg.train
    opt_groups = param_groups(model, t.lr, t.weight_decay)
    if expert_group is not None:
        # MoE: ZeRO needs expert params in their own 'moe' groups (reduced and partitioned over
        # the expert-data-parallel group only), made by DeepSpeed's splitter.
        from pretrain.models.moe_parallel import moe_param_groups
        opt_groups = moe_param_groups(opt_groups)
    optimizer = build_optimizer(opt_groups, (t.beta1, t.beta2), t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, t.max_steps, t.warmup_steps, t.cooldown_fraction))
    ds_config = build_ds_config(cfg, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    gas = engine.gradient_accumulation_steps()

    loader = build_train_loader(cfg.data, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size,
                                global_batch_size=t.global_batch_size)
    # Resume (any world / expert-parallel size; all ranks agree on the checkpoint), else
    # train.init_from, else fresh. The config is written only once that has worked.
    step, state = checkpoint.start(engine, loader, cfg, ckpt_root, log=lambda m: print(m, flush=True))
    if rank == 0:
        _write_resolved_config(cfg, run_dir)

    guard = StepGuard(t.max_skipped_steps, rank, world)
    guard.install(engine)
    logger = MetricsLogger(run_dir, cfg.to_dict(), enabled=rank == 0, max_steps=t.max_steps,
                           wandb_cfg={"enabled": cfg.run.wandb, "mode": cfg.run.wandb_mode,
                                      "project": cfg.run.wandb_project, "name": cfg.run.name,
                                      "id": wandb_run_id(cfg.run.name, run_dir)})
    logger.truncate_after(step)  # lines a previous attempt logged past this checkpoint
    eval_sets = build_eval_sets(cfg, rank, world)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    start_step = step
    image_tokens_seen = state.get("image_tokens_seen", 0)  # this rank's D_v share

    def new_window() -> dict:
        # Losses stay on the device until a log step: no host sync per micro-batch.
        return {"loss": LossMeter(device), "steps": 0,
                "tokens": 0, "image_tokens": 0, "targets": 0, "t0": time.time(),
                "data": StatsAccumulator(cfg.data.sources), "wait": DataWait(), "skipped": 0}

    window = new_window()
    peak_flops = device_peak_flops(device, resolve_precision(t.precision))
    last_eval: dict = {}
    if rank == 0:
        print(f"[train] {cfg.run.name}: {counts.params / 1e6:.2f}M params ({counts.active_params / 1e6:.2f}M "
              f"active), world {world}, "
              f"micro-batch {t.micro_batch_size} x accumulation {gas}, {t.max_steps} steps", flush=True)

    def evaluate_now() -> dict:
        result = evaluate_sources(engine.module, eval_sets, cfg.data.sources, device)
        record = {"type": "eval", "step": step, "tokens": step * tokens_per_step, **result}
        logger.log(record)
        if rank == 0:
            print("[eval] step {} | ".format(step) + " | ".join(f"{k} {v:.4f}" for k, v in result.items()),
                  flush=True)
        return result

    stop = None  # a StopReason from the non-finite guard
    while step < t.max_steps:
        lr_now = base_lr(optimizer)
        micro_batches = []  # the whole step first: the loss is normalised by all its targets
        for _ in range(gas):
            cpu_batch = window["wait"].next(loader)
            n_image = int(cpu_batch.is_patch.sum())  # counted on the host copy: no device sync
            window["image_tokens"] += n_image
            window["targets"] += count_targets(cpu_batch)
            window["tokens"] += cpu_batch.tokens.numel()
            image_tokens_seen += n_image
            window["data"].add(loader.last_stats)
            micro_batches.append(cpu_batch)
        window["loss"].add(forward_backward(engine, micro_batches, device, lambda x: guard.loss(x, step + 1)))
        engine.step()
        step += 1
        window["steps"] += 1
        stop = guard.after_step(engine, step)
        window["skipped"] += guard.last_skipped
        grad_norm = engine.get_global_grad_norm()

        if step % cfg.run.log_every == 0 or step == t.max_steps or stop:
            ops = window_metrics(device, window["t0"], window["steps"], window["wait"].seconds)
            loss, aux = window["loss"].reduce()  # mean over the window's text targets (nan: all skipped)
            elapsed = max(time.time() - window["t0"], 1e-9)
            model_flops = training_flops(cfg.model, cfg.data.seq_len, window["tokens"], window["image_tokens"],
                                         window["targets"])
            record = {"type": "train", "step": step, "tokens": step * tokens_per_step, "loss": loss,
                      "aux_loss": aux, "lr": lr_now,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "tokens_per_s": window["steps"] * tokens_per_step / elapsed,
                      "step_time_s": elapsed / window["steps"],
                      "tflops_per_rank": model_flops / elapsed / 1e12,
                      "mfu": model_flops / elapsed / peak_flops if peak_flops else None,
                      "image_token_fraction": window["image_tokens"] / max(window["tokens"], 1),
                      "skipped_steps": window["skipped"], "skipped_steps_total": guard.skipped_total, **ops}
            record.update(_data_stats_over_ranks(window["data"], device))
            if cfg.model.kind == "moe":  # MoE router load per layer and expert (collective: all ranks)
                from pretrain.models.moe import moe_metrics
                record.update(moe_metrics(engine.module, all_reduce=True))
            logger.log(record)
            logger.console(step, record)
            window = new_window()

        if eval_sets and (step % t.eval_every == 0 or step == t.max_steps):
            last_eval = evaluate_now()
        if stop:
            break
        interrupted = t.stop_after_steps > 0 and step - start_step >= t.stop_after_steps
        if step % t.save_every == 0 or step == t.max_steps or interrupted:
            if not state_is_finite(engine, device):
                stop = nonfinite_state_stop(step)
                break
            checkpoint.save(engine, ckpt_root, step, {"loader": loader.state_dict(),
                                                      "image_tokens_seen": image_tokens_seen},
                            keep=t.keep_checkpoints, config=cfg)
        if interrupted and step < t.max_steps:
            if rank == 0:
                print(f"[train] stopping after {t.stop_after_steps} steps (train.stop_after_steps); "
                      f"rerun to resume", flush=True)
            logger.close()
            return {"finished": False, "step": step}

    image_tokens = int(_sum_over_ranks([image_tokens_seen], device)[0])
    if stop:
        return _stopped(cfg, stop, rank, run_dir, guard, logger,
                        run_summary(cfg, step, step * tokens_per_step, image_tokens, last_eval))
    if eval_sets and not last_eval:  # resumed a finished run: report its final losses again
        logger.truncate_after(step, also_at_step=("eval",))  # in place of the first report
        last_eval = evaluate_now()
    summary = run_summary(cfg, step, step * tokens_per_step, image_tokens, last_eval)
    summary["skipped_steps"] = guard.skipped_total
    if t.image_probe:
        probe = run_image_probe(engine.module, cfg, rank, world, device)
        summary["image_probe"] = probe
        if rank == 0:
            (run_dir / "probe.json").write_text(json.dumps(probe, indent=2))
            print(f"[probe] held-out captions ({probe['examples']}): colour accuracy "
                  f"{probe['image/colour_acc']:.1%}, shape accuracy {probe['image/shape_acc']:.1%} "
                  f"with the image; with noise instead: colour {probe['noise/colour_acc']:.1%}, "
                  f"shape {probe['noise/shape_acc']:.1%} (chance <= {probe['chance']:.0%})", flush=True)
            summary["captions"] = run_caption_demo(engine.module, cfg, run_dir, step)
        dist.barrier()  # the other ranks wait for rank 0's captions
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        png = plot_losses(run_dir)
        print(f"[train] done: {run_dir}/summary.json, loss curve {png}", flush=True)
    logger.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pretrain a native multimodal model.")
    p.add_argument("--config", required=True, help="YAML recipe (pretrain/configs/...)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 3 if "stopped" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
