"""`megatrain plan`: will a run fit, how long will it take, and what will it cost, before it is
queued.

    memory     megatrain/memory.py, per GPU, against the profile's accelerator
    time       step time = FLOPs per step / (GPUs x peak x MFU) + the communication that does not
               overlap; MFU measured in an earlier run on the same GPU (`calibration`), or a
               per-GPU default labelled "assumed"; Slurm jobs from the QoS time limit
    energy     GPU-hours x the measured mean power per GPU, or the board power (an upper
               bound), x PUE x grid intensity: megatrain.carbon.estimate, as `megatrain carbon`
    scaling    compute-optimal tokens (Hoffmann et al. 2022: about 20 per parameter, and their
               fitted loss L(N, D) = E + A/N^alpha + B/D^beta), and what a GPU-hour budget buys

Everything here is arithmetic on the config, the cluster profile and, optionally, a run
directory: no GPU, no process group, no dataset (the vocabulary is the config's, or `vocab`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from megatrain.carbon import estimate
from megatrain.config import ClusterProfile, Config, ConfigError, load_cluster
from megatrain.hardware import ACCELERATORS, Accelerator, match_accelerator, peak_flops
from megatrain.memory import memory_per_gpu
from megatrain.plan import RunPlan, plan_run

# MFU when no run of ours on this GPU says better: what well-tuned dense-transformer training
# reaches (Megatron-LM and BLOOM report 40-55% on A100; the earlier H100 reference run of a plain
# GPT in bf16 measured 43-55%; V100 in fp16 rarely passes 30-35%). Labelled "assumed" wherever
# it is used.
ASSUMED_MFU = {"V100": 0.30, "A100": 0.40, "H100": 0.40, "H200": 0.40, "cpu": 0.10}
RECOMPUTE = 4 / 3  # activation checkpointing runs each forward twice: 8 FLOPs per weight, not 6
OVERLAP = 2 / 3  # the share of a step's compute that data-parallel reductions can hide behind
JOB_OVERHEAD_H = 0.25  # per Slurm job: start-up, resume, the checkpoint before the time limit
HOST_PER_PROCESS_GIB = 3.0  # Python, torch, CUDA host state, the loader's pinned batches
# ZeRO-Offload's optimizer step on the CPU, per GPU: its gradient partition down and weights back
# over PCIe, and DeepSpeed's CPU Adam over the GPU's share of the node's cores (orders of
# magnitude, assumed: measure with --calibrate on a run that offloads)
PCIE_GB_S = 12.0
CPU_ADAM_PARAMS_PER_S = 1e9
COMM_WARNING = 0.5  # warn when exposed communication is more than this share of a step

# Hoffmann et al. 2022 (Chinchilla), approach 3: L(N, D) = E + A / N^alpha + B / D^beta
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TOKENS_PER_PARAM = 20  # the same paper's compute-optimal ratio (70B parameters, 1.4T tokens)


def family(accel: Accelerator) -> str:
    return "cpu" if accel.key.startswith("cpu") else accel.key[:4]


@dataclass(frozen=True)
class Calibration:
    """What an earlier run measured: MFU (median of its records after the first), mean power
    per device when metered, and whether it recomputed activations."""

    run_dir: str
    mfu: float
    power_w: float | None
    activation_checkpointing: bool


def calibration(run_dir: str | Path, profile: ClusterProfile) -> Calibration:
    """Read RUN_DIR's metrics.jsonl and run_start; the run must have been on the profile's GPU
    type."""
    from megatrain.report import read_metrics, read_run_info

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"--calibrate {run_dir}: no metrics.jsonl there (not a run directory?)")
    info = read_run_info(run_dir)
    measured_on = info.get("accelerator", "")
    row = match_accelerator(measured_on) if measured_on else None
    wanted = ACCELERATORS.get(profile.accelerator)
    same = row is not None and wanted is not None and family(row) == family(wanted)
    if profile.accelerator == "cpu":
        same = measured_on.startswith("CPU")
    if not same:
        raise ConfigError(
            f"--calibrate {run_dir}: that run ran on {measured_on or 'an unknown device'}, but "
            f"cluster '{profile.name}' has {profile.accelerator}: MFU and power do not carry "
            "over between GPU types; calibrate with a run on the same GPU"
        )
    records = [r for r in read_metrics(run_dir) if r.get("mfu")]
    if len(records) < 2:
        raise ConfigError(
            f"--calibrate {run_dir}: fewer than 2 metrics records with an MFU; run longer"
        )
    steady = records[1:]  # the first interval holds start-up and compilation
    world = int(info.get("world_size") or 1)
    metered = info.get("energy_method") not in (None, "estimate")
    power = statistics.median(r["power_w"] for r in steady) / world if metered else None
    ac = bool(info.get("config", {}).get("parallel", {}).get("activation_checkpointing"))
    return Calibration(str(run_dir), statistics.median(r["mfu"] for r in steady), power, ac)


@dataclass
class Forecast:
    cfg: Config
    profile: ClusterProfile
    plan: RunPlan
    nodes: int
    gpus: int
    memory: dict
    step_time_s: float
    compute_s: float
    comm_s: float
    mfu: float
    mfu_source: str
    power_w: float
    power_source: str
    jobs: int
    wall_clock_days: float
    gpu_hours: float
    carbon: object
    warnings: list[str] = field(default_factory=list)

    @property
    def gpu_memory_gb(self) -> float:
        return ACCELERATORS[self.profile.accelerator].memory_gb or 0.0

    @property
    def host_memory_gb_per_node(self) -> float:
        per_node = min(self.gpus, self.profile.gpus_per_node or self.gpus)
        return per_node * (self.memory["host"] + HOST_PER_PROCESS_GIB)

    @property
    def fits(self) -> bool:
        host_ok = (
            not self.profile.host_memory_gb
            or self.host_memory_gb_per_node <= self.profile.host_memory_gb
        )
        return self.memory["total"] <= self.gpu_memory_gb and host_ok

    def layout(self) -> dict:
        p, L = self.cfg.parallel, self.plan.layout
        return {
            "dp": self.plan.dp_size,
            "tp": self.plan.tp_size,
            "zero_stage": p.zero_stage,
            "micro_batch": L.micro_batch,
            "grad_accum": L.grad_accum,
            "global_batch": L.global_batch,
            "activation_checkpointing": p.activation_checkpointing,
            "offload_optimizer": p.offload_optimizer,
            "offload_params": p.offload_params,
            "precision": self.cfg.precision,
        }

    def summary(self) -> dict:
        plan, c = self.plan, self.carbon
        tokens = plan.total_tokens
        memory = {k: round(v, 3) for k, v in self.memory.items() if isinstance(v, float)}
        return {
            "cluster": self.profile.name,
            "accelerator": self.profile.accelerator,
            "nodes": self.nodes,
            "gpus": self.gpus,
            "params": plan.params,
            "flops_per_token": plan.flops_per_token,
            "tokens": tokens,
            "steps": plan.max_steps,
            "layout": self.layout(),
            "memory_gb_per_gpu": {k: memory[k] for k in memory if k != "host"},
            "memory_peak_phase": self.memory["peak_phase"],
            "gpu_memory_gb": self.gpu_memory_gb,
            "fits": self.fits,
            "host_memory_gb_per_node": round(self.host_memory_gb_per_node, 1),
            "host_memory_gb_available": self.profile.host_memory_gb,
            "step_time_s": round(self.step_time_s, 4),
            "compute_s": round(self.compute_s, 4),
            "communication_s": round(self.comm_s, 4),
            "mfu": round(self.mfu, 4),
            "mfu_source": self.mfu_source,
            "wall_clock_days": round(self.wall_clock_days, 2),
            "jobs": self.jobs,
            "gpu_hours": round(self.gpu_hours, 1),
            "power_w_per_gpu": round(self.power_w, 1),
            "power_source": self.power_source,
            "energy_kwh_it": round(c.energy_kwh_it, 1),
            "energy_kwh_facility": round(c.energy_kwh_facility, 1),
            "co2_kg": round(c.co2_kg, 1),
            "pue": c.pue,
            "intensity_g_per_kwh": c.intensity_g_per_kwh,
            "chinchilla_tokens": TOKENS_PER_PARAM * plan.params,
            "tokens_per_param": round(tokens / plan.params, 1),
            "predicted_loss": round(chinchilla_loss(plan.params, tokens), 3),
            "warnings": self.warnings,
        }


def _qos_hours(profile: ClusterProfile) -> float | None:
    s = profile.slurm
    return s.qos_max_hours.get(s.default_qos) if s.default_qos else None


def forecast(
    cfg: Config,
    profile: ClusterProfile | str,
    nodes: int = 1,
    gpus: int | None = None,
    calibrated: Calibration | None = None,
    vocab: int | None = None,
) -> Forecast:
    """The plan for `cfg` on `nodes` nodes of `profile` (all their GPUs, or `gpus` in all when
    fewer than a node)."""
    if isinstance(profile, str):
        profile = load_cluster(profile)
    accel = ACCELERATORS.get(profile.accelerator)
    if accel is None or accel.rough:
        raise ConfigError(
            f"cluster '{profile.name}' has accelerator '{profile.accelerator}': `megatrain plan` "
            f"needs a GPU of the table ({', '.join(ACCELERATORS)})"
        )
    per_node = profile.gpus_per_node
    if gpus is not None and gpus > per_node * nodes:
        raise ConfigError(
            f"--gpus {gpus} is more than {nodes} node(s) of '{profile.name}' have "
            f"({per_node} per node)"
        )
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    world = gpus or per_node * nodes
    cfg = dataclasses.replace(cfg, cluster=profile.name)
    plan = plan_run(cfg, world, vocab, local_world_size=min(world, per_node))
    memory = memory_per_gpu(cfg, plan, gpu=True)
    peak = peak_flops(accel, cfg.precision)

    if calibrated:
        mfu, mfu_source = calibrated.mfu, f"measured in {calibrated.run_dir}"
        recompute = (RECOMPUTE if cfg.parallel.activation_checkpointing else 1) / (
            RECOMPUTE if calibrated.activation_checkpointing else 1
        )
    else:
        mfu, mfu_source = ASSUMED_MFU[family(accel)], f"assumed for {family(accel)}"
        recompute = RECOMPUTE if cfg.parallel.activation_checkpointing else 1
    tokens_per_step = plan.layout.tokens_per_step
    compute_s = plan.flops_per_token * tokens_per_step * recompute / (world * peak * mfu)
    comm_s, warnings = _communication(cfg, plan, profile, nodes, compute_s)
    if cfg.parallel.offload_optimizer != "none":
        partition = plan.params / plan.tp_size / plan.dp_size
        comm_s += partition * (4 + 2) / (PCIE_GB_S * 1e9) + partition / CPU_ADAM_PARAMS_PER_S
    step_s = compute_s + comm_s
    train_h = plan.max_steps * step_s / 3600

    limit = _qos_hours(profile)
    if limit and limit > JOB_OVERHEAD_H:
        jobs = max(1, math.ceil(train_h / (limit - JOB_OVERHEAD_H)))
    else:
        jobs = 1
    wall_h = train_h + jobs * JOB_OVERHEAD_H
    gpu_hours = wall_h * world

    if calibrated and calibrated.power_w:
        power, power_source = calibrated.power_w, f"measured in {calibrated.run_dir}"
    else:
        power = profile.device_power_w or accel.tdp_w
        power_source = "board power: an upper bound"
    carbon = estimate(
        gpu_hours=gpu_hours,
        gpu_power_w=power,
        pue=profile.pue,
        intensity_g_per_kwh=profile.carbon_intensity_g_per_kwh,
    )
    result = Forecast(
        cfg,
        profile,
        plan,
        nodes,
        world,
        memory,
        step_s,
        compute_s,
        comm_s,
        mfu,
        mfu_source,
        power,
        power_source,
        jobs,
        wall_h / 24,
        gpu_hours,
        carbon,
        warnings,
    )
    if memory["total"] > result.gpu_memory_gb:
        warnings.append(
            f"needs {memory['total']:.1f} GiB per GPU, the {accel.name} has "
            f"{result.gpu_memory_gb:.0f}: see `megatrain plan ... --search`"
        )
    if profile.host_memory_gb and result.host_memory_gb_per_node > profile.host_memory_gb:
        warnings.append(
            f"needs {result.host_memory_gb_per_node:.0f} GiB of host memory per node, the "
            f"profile says {profile.host_memory_gb:.0f}"
        )
    return result


def _communication(
    cfg: Config, plan: RunPlan, profile: ClusterProfile, nodes: int, compute_s: float
) -> tuple[float, list[str]]:
    """Seconds per step of communication that compute does not hide (the time of ZeRO-Offload's
    CPU step is added by the caller), and warnings.

    Data parallelism moves 2 (N-1)/N gradient bytes per step (all-reduce, or ZeRO's
    reduce-scatter plus all-gather), ZeRO-3 one more all-gather of the weights (forward and
    backward gather them; backward's reduce-scatter replaces the all-reduce): overlapped with
    the backward pass and the prefetch, up to OVERLAP of the compute. Tensor parallelism
    all-reduces each block's output twice forward and twice backward, on the critical path.
    Bandwidths per GPU from the profile: inter-node when the group spans nodes.
    """
    warnings: list[str] = []
    intra, inter = profile.intra_node_gb_s * 1e9, profile.inter_node_gb_s * 1e9
    if not intra:
        return 0.0, ["no bandwidths in the cluster profile: communication not estimated"]
    tp, dp, L = plan.tp_size, plan.dp_size, plan.layout
    word = 2 if cfg.precision != "fp32" else 4
    dp_bw = inter if nodes > 1 and inter else intra
    grad_bytes = plan.params / tp * word
    volume = 2 * (dp - 1) / dp * grad_bytes
    if cfg.parallel.zero_stage == 3:
        volume *= 1.5
    dp_s = volume / dp_bw
    exposed_dp = max(0.0, dp_s - OVERLAP * compute_s)
    per_allreduce = L.micro_batch * L.seq_len * plan.model.d_model * word * 2 * (tp - 1) / tp
    tp_s = 4 * plan.model.n_layer * L.grad_accum * per_allreduce / intra if tp > 1 else 0.0
    comm = exposed_dp + tp_s
    if comm > COMM_WARNING * (compute_s + comm):
        advice = "fewer nodes or a larger global batch"
        if cfg.parallel.zero_stage == 3:
            advice += ", or ZeRO-1/2 instead of 3"
        if tp > 1:
            advice += ", or a smaller tensor size"
        warnings.append(
            f"communication would dominate: {comm:.3g} s per step not hidden by compute "
            f"(data-parallel {dp_s:.3g} s at {dp_bw / 1e9:g} GB/s, tensor-parallel {tp_s:.3g} s) "
            f"against {compute_s:.3g} s of compute; {advice}"
        )
    return comm, warnings


# ----------------------------------------------------------------------------- scaling


def chinchilla_loss(params: float, tokens: float) -> float:
    """Hoffmann et al. 2022's fitted loss (their data and tokenizer: compare trends, not
    absolute values with another corpus)."""
    c = CHINCHILLA
    return c["E"] + c["A"] / params ** c["alpha"] + c["B"] / tokens ** c["beta"]


def compute_optimal(flops: float) -> dict:
    """The model size and tokens that minimize the fitted loss for `flops` (C = 6 N D), and the
    20-tokens-per-parameter rule's answer for the same compute."""
    c = CHINCHILLA
    a, b = c["alpha"], c["beta"]
    g = (a * c["A"] / (b * c["B"])) ** (1 / (a + b))
    params = g * (flops / 6) ** (b / (a + b))
    tokens = flops / 6 / params
    rule_params = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return {
        "flops": flops,
        "params": params,
        "tokens": tokens,
        "predicted_loss": chinchilla_loss(params, tokens),
        "rule_params": rule_params,
        "rule_tokens": TOKENS_PER_PARAM * rule_params,
    }


def budget_advice(result: Forecast, gpu_hours: float) -> dict:
    """What `gpu_hours` buy on this cluster at the forecast's MFU: the compute, and the
    compute-optimal model and tokens for it."""
    accel = ACCELERATORS[result.profile.accelerator]
    flops = gpu_hours * 3600 * peak_flops(accel, result.cfg.precision) * result.mfu
    return {"gpu_hours": gpu_hours, **compute_optimal(flops)}


# ----------------------------------------------------------------------------- search


def search(
    cfg: Config,
    profile: ClusterProfile,
    node_counts: list[int],
    calibrated: Calibration | None = None,
    vocab: int | None = None,
    rank_by: str = "time",
) -> list[Forecast]:
    """Every layout that fits: ZeRO stage x tensor size x micro-batch x activation checkpointing
    x optimizer offload, for each node count; fastest first, then fewest kWh (or fewest kWh
    first with `rank_by="energy"`)."""
    fitting = []
    zero_stages = [0] if cfg.precision == "fp32" else []
    zero_stages += [1, 2, 3]
    tensor_sizes = [t for t in (1, 2, 4, 8) if t <= profile.gpus_per_node]
    for nodes in node_counts:
        for zero in zero_stages:
            for tp in tensor_sizes:
                for micro in (1, 2, 4, 8, 16, 32):
                    for ac in (False, True):
                        for offload in ("none", "cpu") if zero else ("none",):
                            parallel = dataclasses.replace(
                                cfg.parallel,
                                zero_stage=zero,
                                tensor=tp,
                                activation_checkpointing=ac,
                                offload_optimizer=offload,
                            )
                            batch = dataclasses.replace(cfg.batch, micro_batch=micro, grad_accum=0)
                            candidate = dataclasses.replace(cfg, parallel=parallel, batch=batch)
                            try:
                                result = forecast(
                                    candidate, profile, nodes, calibrated=calibrated, vocab=vocab
                                )
                            except ConfigError:
                                continue  # a layout that cannot exist (uneven splits)
                            if result.fits:
                                fitting.append(result)

    def key(f: Forecast) -> tuple:
        time, kwh = f.wall_clock_days, f.carbon.energy_kwh_facility
        # on equal forecasts, what runs faster in practice than a constant MFU says: no
        # recomputation, no offload, less tensor parallelism, larger micro-batches, less sharding
        L = f.layout()
        practice = (
            L["activation_checkpointing"],
            L["offload_optimizer"] != "none",
            L["tp"],
            -L["micro_batch"],
            L["zero_stage"],
        )
        return (time, kwh, *practice) if rank_by == "time" else (kwh, time, *practice)

    fitting.sort(key=key)
    return fitting


def nearest_fitting(cfg: Config, profile: ClusterProfile, nodes: int, vocab=None):
    """The fitting layout on the same nodes that changes the fewest settings, fastest first."""
    current = forecast(cfg, profile, nodes, vocab=vocab).layout()
    found = search(cfg, profile, [nodes], vocab=vocab)
    if not found:
        return None

    def changes(f: Forecast) -> int:
        return sum(f.layout()[k] != current[k] for k in current)

    return min(found, key=lambda f: (changes(f), f.wall_clock_days))


# ----------------------------------------------------------------------------- text


def _n(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def render(result: Forecast) -> str:
    s = result.summary()
    L, m = s["layout"], s["memory_gb_per_gpu"]
    offload = f", offload {L['offload_optimizer']}" if L["offload_optimizer"] != "none" else ""
    lines = [
        f"plan: {result.cfg.run.name} on {s['nodes']} x {result.profile.name} "
        f"({s['gpus']} {s['accelerator']})",
        f"  model          {s['params'] / 1e9:.3g}B parameters, "
        f"{s['flops_per_token'] / 1e9:.3g} GFLOP per token",
        f"  tokens         {s['tokens'] / 1e9:.4g}B in {s['steps']:,} steps "
        f"({s['tokens_per_param']} per parameter; compute-optimal ~{TOKENS_PER_PARAM})",
        f"  layout         dp {L['dp']} x tp {L['tp']}, ZeRO-{L['zero_stage']}, {L['precision']}, "
        f"micro-batch {L['micro_batch']} x accumulation {L['grad_accum']} "
        f"(global {L['global_batch']}), activation checkpointing "
        f"{'on' if L['activation_checkpointing'] else 'off'}{offload}",
        "  memory per GPU "
        + ", ".join(f"{k} {m[k]:.2f}" for k in m if k != "total")
        + f" GiB; peak in the {s['memory_peak_phase']}",
        f"                 total {m['total']:.1f} of {s['gpu_memory_gb']:.0f} GiB: "
        + ("fits" if s["fits"] else "DOES NOT FIT"),
        f"  host memory    {s['host_memory_gb_per_node']:.0f} GiB per node"
        + (
            f" of {s['host_memory_gb_available']:.0f}"
            if s["host_memory_gb_available"]
            else " (the profile does not say how much there is)"
        ),
        f"  step           {s['step_time_s']:.3g} s ({s['compute_s']:.3g} s compute at MFU "
        f"{100 * s['mfu']:.0f}% ({s['mfu_source']}), {s['communication_s']:.3g} s exposed "
        "communication)",
        f"  time           {s['wall_clock_days']:.3g} days in {s['jobs']} job(s) at the QoS "
        "limit (queue waits not counted)",
        f"  GPU-hours      {_n(s['gpu_hours'])}",
        f"  energy         {_n(s['energy_kwh_it'])} kWh IT, {_n(s['energy_kwh_facility'])} kWh "
        f"facility (PUE {s['pue']}), at {s['power_w_per_gpu']:.0f} W per GPU "
        f"({s['power_source']})",
        f"  CO2e           {_n(s['co2_kg'])} kg at {s['intensity_g_per_kwh']:g} g/kWh",
        f"  scaling        Chinchilla-optimal tokens for this size: "
        f"{s['chinchilla_tokens'] / 1e9:.4g}B; fitted loss at this budget "
        f"{s['predicted_loss']:.3f} (Hoffmann et al. 2022)",
    ]
    lines += [f"  warning        {w}" for w in s["warnings"]]
    return "\n".join(lines)


def render_search(results: list[Forecast], limit: int = 15) -> str:
    if not results:
        return "search: no layout fits"
    head = (
        f"{'nodes':>5} {'zero':>4} {'tp':>3} {'micro':>5} {'accum':>5} {'ckpt':>4} "
        f"{'offload':>7} {'GiB/GPU':>8} {'step s':>7} {'days':>6} {'GPU-h':>9} {'kWh':>9}"
    )
    rows = [head]
    for f in results[:limit]:
        L = f.layout()
        rows.append(
            f"{f.nodes:>5} {L['zero_stage']:>4} {L['tp']:>3} {L['micro_batch']:>5} "
            f"{L['grad_accum']:>5} {'on' if L['activation_checkpointing'] else 'off':>4} "
            f"{L['offload_optimizer']:>7} {f.memory['total']:>8.1f} {f.step_time_s:>7.3f} "
            f"{f.wall_clock_days:>6.2f} {f.gpu_hours:>9,.0f} "
            f"{f.carbon.energy_kwh_facility:>9,.0f}"
        )
    more = len(results) - limit
    if more > 0:
        rows.append(f"... and {more} more that fit (--json lists all)")
    return "\n".join(rows)
