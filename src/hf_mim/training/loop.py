"""The training loop of pretrain.py and train_tokenizer.py (Accelerate): one function per concern.

Exact resumption rests on three things: the data order and every augmentation and mask are a pure
function of (seed, epoch, position) (see `hf_mim.data`); the model's own randomness (dropout, drop
path) is reseeded at every micro-batch from (seed, epoch, position, process); and each checkpoint
records the position inside the epoch, which is skipped with `skip_first_batches` on resume. A
streamed training set instead resumes from the stream's own state (see `hf_mim.streaming`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ..data import (
    EpochSampler, FixedSampler, ImageDatasets, ImageExamples, StreamingImageExamples, derive_seed, load_image_datasets,
)
from ..data_fingerprint import data_fingerprint, warn_if_data_changed
from ..distributed import check_sharding_engaged
from ..fast_data import fast_training_examples
from ..launch import check_one_run_per_launch, cpu_process_group_needed, set_tf32, warn_if_bf16_is_emulated
from ..preemption import Preempted, PreemptionGuard, resume_hint
from ..run_lock import OutputDirLock
from ..streaming import ReferenceRows, StreamCheckpoint, StreamedTrainingExamples, StreamLoader
from .arguments import resolve_mixed_precision, with_data_size_rule
from .checkpoints import (
    TrainerState, load_checkpoint, prune_checkpoints, remove_incomplete_checkpoints, resolve_resume_path, save_checkpoint,
)
from .data_loading import DataWaitMeter, check_num_workers, cores_per_process, default_num_workers, describe_workers
from .method import TrainingMethod
from .model_choice import choose_preset, train_image_count
from .optimization import (
    build_optimizer, build_scheduler, effective_batch_size, resolve_learning_rate, resolve_warmup_steps,
)
from .outputs import save_outputs, write_results
from .tracking import hyperparameters, resolve_trackers

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """The run's size, fixed before the first step."""

    batches_per_epoch: int | None  # micro-batches per process; None when streaming
    steps_per_epoch: int | None
    max_steps: int
    total_batch_size: int
    learning_rate: float
    warmup_steps: int


@dataclass
class Run:
    """Everything the loop functions share: the options (read-only), and what the run decided itself."""

    args: object
    accelerator: Accelerator
    method: TrainingMethod
    data: ImageDatasets
    model: torch.nn.Module
    processor: object
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    train_loader: object = None
    train_examples: object = None
    eval_loader: object = None
    eval_examples: object = None
    plan: Plan | None = None
    state: TrainerState = field(default_factory=TrainerState)
    meter: LossMeter | None = None
    data_wait: DataWaitMeter | None = None
    num_workers: int = 0  # data-loader workers per process
    workers: str = ""  # how many data-loader workers and why
    do_eval: bool = False  # --do_eval, or (not given) whether the data has held-out images
    model_choice: str | None = None  # the preset chosen for the data, and why (no --config_name / --model_name_or_path)
    last_checkpoint_step: int = -1
    eval_results: dict = field(default_factory=dict)
    eval_step: int = -1  # the step eval_results were measured at
    checkpoint_extras: dict = field(default_factory=dict)  # more state of a checkpoint (see checkpoints.py)
    preemption: PreemptionGuard | None = None


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def build_accelerator(args) -> Accelerator:
    os.makedirs(args.output_dir, exist_ok=True)
    dynamo = TorchDynamoPlugin(backend="inductor", mode=args.torch_compile_mode) if args.torch_compile else None
    accelerator = Accelerator(
        cpu=cpu_process_group_needed(),  # torchrun on a CPU-only machine: one gloo group, not N runs
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args),
        log_with=resolve_trackers(args.report_to, args.output_dir),
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "runs")),
        # Each process reads its own share of a stream, nothing is broadcast (the training stream: hf_mim.streaming;
        # a streamed evaluation set: accelerate's IterableDatasetShard).
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
        dynamo_plugin=dynamo,
    )
    check_one_run_per_launch(accelerator.num_processes)
    check_sharding_engaged(accelerator)  # an FSDP / DeepSpeed config that accelerate would drop: refuse
    warn_if_bf16_is_emulated(accelerator.mixed_precision, accelerator.device)  # e.g. a shipped GPU config on a CPU
    return accelerator


def setup_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING, force=True)
    for name in ("datasets", "huggingface_hub"):  # their own handler besides the root's printed each warning twice
        logging.getLogger(name).handlers.clear()
    if not accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def load_data(args, accelerator: Accelerator) -> ImageDatasets:
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        return load_image_datasets(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_dir=args.train_dir,
            validation_dir=args.validation_dir, train_file=args.train_file, validation_file=args.validation_file,
            cache_dir=args.cache_dir, token=args.token, streaming=args.streaming,
            image_column_name=args.image_column_name, label_column_name=args.label_column_name,
            train_val_split=args.train_val_split, seed=args.data_seed, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
        )


def build_model(args, method: TrainingMethod, data: ImageDatasets) -> tuple[torch.nn.Module, str | None]:
    """The model, and the preset chosen for the data and why (None: --config_name / --model_name_or_path)."""
    preset = choice = None
    if not (args.model_name_or_path or args.config_name):
        preset, why = choose_preset(method.name, data)
        choice = f"{preset} ({why})"
    model = method.build_model(preset)
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, choice


def make_examples(run: Run, dataset, train: bool):
    args, method = run.args, run.method
    streamed = isinstance(dataset, datasets.IterableDataset)
    fast = train and fast_training_examples(args, method, run.processor, dataset, run.data.image_column,
                                            run.accelerator.device)
    if train and streamed:
        return streamed_training_examples(run, dataset, fast)
    if fast:
        return fast
    transform = (method.train_transform if train else method.eval_transform)(run.processor)
    if streamed:  # an evaluation stream (training streams: above): the same order and masks on every pass
        return StreamingImageExamples(dataset, run.data.image_column, transform, seed=args.data_seed, shuffle=False,
                                      image_mode=method.image_mode)
    return ImageExamples(dataset, run.data.image_column, transform, image_mode=method.image_mode)


def streamed_training_examples(run: Run, dataset, fast) -> StreamedTrainingExamples:
    """This process's share of the stream, in lanes (default: one per data-loader worker), in batches."""
    args, accelerator = run.args, run.accelerator
    rows = fast or ReferenceRows(run.method.train_transform(run.processor), run.data.image_column,
                                 image_mode=run.method.image_mode)
    lanes = args.stream_lanes if args.stream_lanes is not None else max(1, run.num_workers)
    examples = StreamedTrainingExamples(
        dataset, rows, args.per_device_train_batch_size, seed=args.data_seed, rank=accelerator.process_index,
        num_processes=accelerator.num_processes, lanes=lanes, block_size=args.shuffle_buffer_size)
    run.checkpoint_extras["stream"] = StreamCheckpoint(examples)
    return examples


def make_loader(run: Run, examples, batch_size: int, train: bool) -> torch.utils.data.DataLoader:
    args, workers = run.args, run.num_workers
    if isinstance(examples, StreamedTrainingExamples):
        return StreamLoader(examples, workers, run.accelerator.device,
                            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available())
    sampler = None
    if isinstance(examples, ImageExamples):
        sampler = EpochSampler(len(examples), args.data_seed) if train else FixedSampler(len(examples), args.data_seed)
    return torch.utils.data.DataLoader(
        examples, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=workers,
        pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        persistent_workers=args.dataloader_persistent_workers and workers > 0,
        collate_fn=getattr(examples, "collate", None),  # the fast path's padded uint8 canvases
    )


def build_loaders(run: Run) -> None:
    args = run.args
    if args.do_train:
        if run.data.train is None:
            raise ValueError(f"{run.data.source} has no training split; pass training data or --no-do_train.")
        run.train_examples = make_examples(run, run.data.train, train=True)
        run.train_loader = make_loader(run, run.train_examples, args.per_device_train_batch_size, train=True)
    if run.do_eval and run.data.eval is not None:
        run.eval_examples = make_examples(run, run.data.eval, train=False)
        run.eval_loader = make_loader(run, run.eval_examples, args.per_device_eval_batch_size, train=False)


def make_plan(run: Run) -> Plan:
    args, accelerator = run.args, run.accelerator
    batches = None if isinstance(run.train_examples, StreamedTrainingExamples) else len(run.train_loader)
    if batches is not None:
        # Per process: `prepare` shards the (drop_last) batches, and each process gets floor(n / processes).
        # Counting the unsharded ones made an epoch never end with several processes (the loop then spun).
        batches //= accelerator.num_processes
    total_batch = effective_batch_size(args.per_device_train_batch_size, accelerator.num_processes,
                                       args.gradient_accumulation_steps)
    if batches == 0:
        raise ValueError(
            f"The training set ({len(run.train_examples)} images) is smaller than one batch of "
            f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes: lower "
            "--per_device_train_batch_size or add data."
        )
    steps_per_epoch = None if batches is None else math.ceil(batches / args.gradient_accumulation_steps)
    max_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    learning_rate = resolve_learning_rate(args.learning_rate, args.base_learning_rate, total_batch)
    return Plan(batches, steps_per_epoch, max_steps, total_batch, learning_rate,
                resolve_warmup_steps(args.warmup_steps, max_steps))


def build_optimization(run: Run) -> None:
    args, plan = run.args, run.plan
    run.optimizer = build_optimizer(
        run.model, plan.learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2),
        run.method.no_weight_decay_names, eps=args.adam_epsilon, fused=run.accelerator.device.type == "cuda",
    )
    # Not passed to accelerator.prepare: it is stepped here once per optimiser step, whatever the process count.
    run.scheduler = build_scheduler(run.optimizer, args.lr_scheduler_type, plan.warmup_steps, plan.max_steps,
                                    args.lr_scheduler_kwargs)


def prepare(run: Run) -> None:
    accelerator = run.accelerator
    if run.optimizer is not None:
        if isinstance(run.train_loader, StreamLoader):  # split by process already (hf_mim.streaming)
            run.model, run.optimizer = accelerator.prepare(run.model, run.optimizer)
        else:
            run.model, run.optimizer, run.train_loader = accelerator.prepare(run.model, run.optimizer,
                                                                             run.train_loader)
        run.checkpoint_extras["scheduler"] = run.scheduler  # saved without pickle (not register_for_checkpointing)
    else:
        run.model = accelerator.prepare(run.model)
    if run.eval_loader is not None:
        run.eval_loader = accelerator.prepare(run.eval_loader)


def on_main_process(accelerator: Accelerator, compute):
    """`compute()` run by the main process only, its result (or the error it raised) given to every process:
    choosing the checkpoint to resume from hashes every file of it, once, not once per process."""
    outcome = [(None, None)]
    if accelerator.is_main_process:
        try:
            outcome = [(compute(), None)]
        except Exception as error:  # raised on every process below, so that none waits for the others
            outcome = [(None, error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def resume(run: Run) -> None:
    """Continue from --resume_from_checkpoint, or automatically from the newest checkpoint in output_dir."""
    args, accelerator = run.args, run.accelerator
    fresh = (args.resume_from_checkpoint or "").lower() == "none"
    if accelerator.is_main_process:
        remove_incomplete_checkpoints(args.output_dir)
    accelerator.wait_for_everyone()
    path = None if fresh else on_main_process(
        accelerator, lambda: resolve_resume_path(args.resume_from_checkpoint, args.output_dir, auto_resume=True))
    # the fingerprint lists and stats every training file: only the main process, which saves and compares it
    fingerprint = data_fingerprint(run.data, args.train_dir, args.train_file) if accelerator.is_main_process else {}
    run.state = TrainerState(num_processes=accelerator.num_processes,
                             per_device_train_batch_size=args.per_device_train_batch_size,
                             gradient_accumulation_steps=args.gradient_accumulation_steps, data_fingerprint=fingerprint)
    if path is None:
        return
    logger.info("Resuming from %s", path)
    saved = load_checkpoint(accelerator, path, run.checkpoint_extras)
    check_resume_compatible(saved, run.state)
    if accelerator.is_main_process:
        warn_if_data_changed(saved.data_fingerprint, run.state.data_fingerprint, path)
    run.state = TrainerState(**{**vars(saved), "num_processes": run.state.num_processes,
                                "per_device_train_batch_size": run.state.per_device_train_batch_size,
                                "gradient_accumulation_steps": run.state.gradient_accumulation_steps,
                                "data_fingerprint": run.state.data_fingerprint})
    run.state.batch_in_epoch = saved.batch_in_epoch * saved.num_processes * saved.per_device_train_batch_size // (
        run.state.num_processes * run.state.per_device_train_batch_size)
    run.last_checkpoint_step = saved.global_step
    if accelerator.is_main_process:
        accelerator.get_tracker("jsonl").write({"event": "resume", "step": saved.global_step, "from": str(path)})


def check_resume_compatible(saved: TrainerState, current: TrainerState) -> None:
    changed = [name for name in ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")
               if getattr(saved, name) != getattr(current, name)]
    if changed:
        logger.warning("Resuming with other %s than the checkpoint was written with: training continues, but the "
                       "data order and step boundaries differ from an uninterrupted run.", changed)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class LossMeter:
    """Running sums on the device, reduced over processes only when logged (no sync per step)."""

    def __init__(self, device):
        self.device = device
        self.window = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, micro-batches, skipped
        self.total_loss, self.total_batches = 0.0, 0
        self.window_start, self.window_images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, skipped: torch.Tensor, images: int) -> None:
        self.window += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=self.device),
                                    skipped.sum().double().to(self.device)])
        self.window_images += images

    def flush(self, accelerator: Accelerator) -> dict:
        """Collective: every process calls it at the same step."""
        mean_loss_sum, batches, skipped = accelerator.reduce(self.window.clone(), reduction="sum").tolist()
        elapsed = time.perf_counter() - self.window_start
        values = {"loss": mean_loss_sum / max(batches, 1.0), "skipped": int(skipped),
                  "images_per_second": self.window_images / elapsed if elapsed > 0 else 0.0}
        self.total_loss += mean_loss_sum
        self.total_batches += int(batches)
        self.window.zero_()
        self.window_start, self.window_images = time.perf_counter(), 0
        return values


def seed_micro_batch(run: Run) -> None:
    """Dropout and drop path draw from torch's global RNG: make it a function of the position."""
    state = run.state
    torch.manual_seed(derive_seed(run.args.seed, state.epoch, state.batch_in_epoch, run.accelerator.process_index))


def epoch_batches(run: Run):
    """This epoch's loader: reseeded for the epoch, and past the batches a resumed run already did."""
    if isinstance(run.train_loader, StreamLoader):  # endless; resumes from the stream's state, skips nothing
        return run.train_loader
    set_epoch(run)
    if run.state.batch_in_epoch:
        return run.accelerator.skip_first_batches(run.train_loader, run.state.batch_in_epoch)
    return run.train_loader


def set_epoch(run: Run) -> None:
    epoch = run.state.epoch
    run.train_loader.set_epoch(epoch)  # reaches our EpochSampler


def train_micro_batch(run: Run, batch: dict) -> float | None:
    """Forward, backward and (at accumulation boundaries) the optimiser step. Returns the gradient norm
    when it was clipped at this step."""
    accelerator, args = run.accelerator, run.args
    batch.pop("labels", None)
    if views := fast_views(run.train_examples):  # decode, crop, resize, flip, jitter, normalise on the device
        batch = views(batch)  # (an image found unreadable there adds to num_skipped)
    skipped = batch.pop("num_skipped")
    grad_norm = None
    with accelerator.accumulate(run.model):
        seed_micro_batch(run)
        loss = run.method.training_loss(run.model, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.meter.add(loss, skipped, args.per_device_train_batch_size * accelerator.num_processes)
    run.state.images_seen += args.per_device_train_batch_size * accelerator.num_processes
    run.state.batch_in_epoch += 1
    return None if grad_norm is None else float(grad_norm)


def fast_views(examples):
    """The fast path's DeviceViews of the training examples (map-style or streamed), or None."""
    if isinstance(examples, StreamedTrainingExamples):
        examples = examples.make_example
    return getattr(examples, "device_views", None)


def finish_optimizer_step(run: Run) -> float:
    """After a synchronised step: the scheduler and the step counter. Returns the lr the step used."""
    learning_rate = run.scheduler.get_last_lr()[0]
    if not run.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the optimiser did not step
        run.scheduler.step()
    run.state.global_step += 1
    run.method.after_optimizer_step(run.state.global_step)  # schedules inside a method (the dVAE temperature)
    return learning_rate


def end_epoch_if_done(run: Run) -> bool:
    plan, state = run.plan, run.state
    if plan.batches_per_epoch is not None and state.batch_in_epoch >= plan.batches_per_epoch:
        state.epoch += 1
        state.batch_in_epoch = 0
        return True
    return False


def log_step(run: Run, learning_rate: float, grad_norm: float | None, progress) -> None:
    values = run.meter.flush(run.accelerator)
    run.state.skipped_images += values.pop("skipped")
    values.update(learning_rate=learning_rate, epoch=fractional_epoch(run), skipped_images=run.state.skipped_images)
    if grad_norm is not None:
        values["grad_norm"] = grad_norm
    values.update(run.method.step_metrics(run.model))  # collective, like the flush above
    values.update(run.data_wait.flush(run.args.logging_steps, DATA_WAIT_HINT))
    run.accelerator.log(values, step=run.state.global_step)
    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{learning_rate:.2e}",
                         img_s=f"{values['images_per_second']:.0f}", data=f"{values['data_wait_fraction']:.0%}",
                         refresh=False)


DATA_WAIT_HINT = ("Raise --dataloader_num_workers (default: the process's cores - 1), use --data_pipeline fast if off, "
                  "or store smaller images (decoding large JPEGs costs the most).")


def fractional_epoch(run: Run) -> float:
    batches = run.plan.batches_per_epoch
    return run.state.epoch + (run.state.batch_in_epoch / batches if batches else 0.0)


def checkpoint(run: Run) -> None:
    args, accelerator = run.args, run.accelerator
    values = run.meter.flush(accelerator)  # fold the pending skipped-image count into the saved state
    run.state.skipped_images += values["skipped"]
    run.state.train_loss_sum, run.state.train_loss_batches = run.meter.total_loss, run.meter.total_batches
    if "stream" in run.checkpoint_extras:
        run.checkpoint_extras["stream"].collect()  # every process's position, for the main one to save
    path = save_checkpoint(accelerator, args.output_dir, run.state, run.checkpoint_extras,
                           save_model_files=lambda folder: save_model_files(run, folder))
    run.last_checkpoint_step = run.state.global_step
    if accelerator.is_main_process:
        prune_checkpoints(args.output_dir, args.save_total_limit)
        logger.info("Saved %s", path)


def save_model_files(run: Run, folder) -> None:
    """What makes a checkpoint folder a model for from_pretrained, finetune.py and probe.py: accelerate wrote
    model.safetensors, this adds config.json and preprocessor_config.json."""
    run.accelerator.unwrap_model(run.model, keep_torch_compile=False).config.save_pretrained(folder)
    run.processor.save_pretrained(folder)


def after_step(run: Run, learning_rate: float, grad_norm: float | None, epoch_ended: bool, progress) -> None:
    args, step = run.args, run.state.global_step
    if step % args.logging_steps == 0:
        log_step(run, learning_rate, grad_norm, progress)
    if run.eval_loader is not None and (
        (args.eval_strategy == "steps" and step % args.eval_steps == 0) or (args.eval_strategy == "epoch" and epoch_ended)
    ):
        evaluate_and_log(run)
    if (isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0) or (
        args.checkpointing_steps == "epoch" and epoch_ended
    ):
        checkpoint(run)


def stop_if_preempted(run: Run) -> None:
    """After a step: on SIGTERM / SIGINT / SIGUSR1 (on any process), checkpoint and exit (see hf_mim.preemption).
    With several processes they agree at logging steps only: the agreement is a collective that waits for
    the device, which the logging step pays anyway (a stop then comes at most --logging_steps steps late)."""
    if run.preemption is None:
        return
    if run.accelerator.num_processes > 1 and run.state.global_step % run.args.logging_steps:
        return
    signum = run.preemption.agreed_signal(run.accelerator.device)
    if signum is None:
        return
    if run.last_checkpoint_step != run.state.global_step:
        checkpoint(run)
    if run.accelerator.is_main_process:
        logger.warning(resume_hint(run.args.output_dir, os.path.join(run.args.output_dir,
                                                                     f"checkpoint-{run.state.global_step}"), signum))
    run.accelerator.end_training()
    raise Preempted(signum)


def train(run: Run) -> dict:
    """The loop. Returns train metrics: train_loss of the whole run, speeds of this invocation."""
    args, accelerator, plan, state = run.args, run.accelerator, run.plan, run.state
    run.meter = LossMeter(accelerator.device)
    run.data_wait = DataWaitMeter(warn=accelerator.is_main_process)
    run.meter.total_loss, run.meter.total_batches = state.train_loss_sum, state.train_loss_batches  # resumed
    start_step, start_time = state.global_step, time.perf_counter()
    progress = tqdm(total=plan.max_steps, initial=state.global_step, desc=f"train {run.method.name}", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    run.method.after_optimizer_step(state.global_step)  # 0, or the step a resumed run starts at
    if run.eval_loader is not None and args.eval_on_start and state.global_step == 0:
        evaluate_and_log(run)
    run.model.train()
    while state.global_step < plan.max_steps:
        batches, resumed_inside_epoch = 0, state.batch_in_epoch > 0
        for batch in run.data_wait.timed(epoch_batches(run)):
            batches += 1
            grad_norm = train_micro_batch(run, batch)
            epoch_ended = end_epoch_if_done(run)
            if not accelerator.sync_gradients:
                continue
            learning_rate = finish_optimizer_step(run)
            progress.update(1)
            after_step(run, learning_rate, grad_norm, epoch_ended, progress)
            if state.global_step >= plan.max_steps:
                break
            stop_if_preempted(run)
        else:  # the loader ran dry
            if batches == 0 and not resumed_inside_epoch:
                raise RuntimeError(f"Epoch {state.epoch} produced no batch: the training data is empty or exhausted.")
    progress.close()
    if args.checkpointing_steps is not None and run.last_checkpoint_step != state.global_step:
        checkpoint(run)  # the final state, so that re-running the command finds the run complete
    values = run.meter.flush(accelerator)
    state.skipped_images += values["skipped"]
    runtime = time.perf_counter() - start_time
    images = (state.global_step - start_step) * plan.total_batch_size
    return {
        "train_loss": run.meter.total_loss / max(run.meter.total_batches, 1), "train_runtime": runtime,
        "train_samples_per_second": images / runtime if runtime > 0 else 0.0,
        "train_steps_per_second": (state.global_step - start_step) / runtime if runtime > 0 else 0.0,
        "train_steps": state.global_step, "epoch": fractional_epoch(run), "skipped_images": state.skipped_images,
        "learning_rate": plan.learning_rate, "total_batch_size": plan.total_batch_size,
    }


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Masked-patch metrics on the held-out images with fixed masks (the same every evaluation)."""
    accelerator, method = run.accelerator, run.method
    was_training = run.model.training
    run.model.eval()
    totals: dict[str, float] = {}
    images, skipped, start = 0, 0, time.perf_counter()
    for batch in run.eval_loader:
        batch_skipped = batch.pop("num_skipped")
        batch.pop("labels", None)
        sums = accelerator.gather_for_metrics(method.eval_sums(run.model, batch))  # per-sample [B] each
        skipped += int(accelerator.gather_for_metrics(batch_skipped).sum())
        images += len(next(iter(sums.values())))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value.double().sum())
    run.model.train(was_training)
    runtime = time.perf_counter() - start
    metrics = {f"eval_{key}": value for key, value in method.eval_metrics(totals).items()}
    return {**metrics, "eval_samples": images, "eval_skipped_images": skipped, "eval_runtime": runtime,
            "eval_samples_per_second": images / runtime if runtime > 0 else 0.0}


def evaluate_and_log(run: Run) -> dict:
    results = evaluate(run)
    run.accelerator.log(results, step=run.state.global_step)
    logger.info("step %d: %s", run.state.global_step,
                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
    run.eval_results, run.eval_step = results, run.state.global_step
    return results


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def configure_backends(args, accelerator: Accelerator) -> tuple[int, str]:
    """TF32; and on CPU, one compute thread per core left after the data-loader workers: more threads
    than cores makes torch's CPU kernels spin and run several times slower. Returns the data-loader
    workers per process (--dataloader_num_workers, or one per core left) and a line saying why."""
    cores = cores_per_process(accelerator.num_processes)
    asked = args.dataloader_num_workers is not None
    workers = args.dataloader_num_workers if asked else default_num_workers(accelerator.num_processes)
    check_num_workers(workers, cores)
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cores - workers))
    if args.tf32:
        set_tf32(True)
    return workers, describe_workers(workers, cores, asked)


def decide_evaluation(args, data: ImageDatasets) -> bool:
    """--do_eval as given, else whether the data has held-out images."""
    if args.do_eval and data.eval is None:
        raise ValueError(f"--do_eval: {data.source} has no held-out images; pass --validation_dir/--validation_file "
                         "or --train_val_split.")
    return data.eval is not None if args.do_eval is None else args.do_eval


def run_training(args, method_class: type[TrainingMethod]) -> dict:
    """Build everything, train, evaluate, save, for the options `args` (`arguments.parse_options`) and the
    method `method_class` (from the script's registry). Returns the results written to all_results.json."""
    accelerator = build_accelerator(args)
    setup_logging(accelerator)
    with OutputDirLock(args.output_dir, enabled=accelerator.is_main_process):  # one run per output folder
        return run_locked(args, accelerator, method_class)


def run_locked(args, accelerator: Accelerator, method_class: type[TrainingMethod]) -> dict:
    num_workers, workers = configure_backends(args, accelerator)
    set_seed(args.seed)  # the model's initial weights
    data = load_data(args, accelerator)
    logger.info("Data: %s (train: %s, eval: %s from %s)", data.source, size_of(data.train), size_of(data.eval),
                data.eval_split)
    do_eval = decide_evaluation(args, data)
    args, recipe = with_data_size_rule(args, train_image_count(data))  # the options, complete
    logger.info(recipe)  # the recipe in force, and why
    method = method_class(args)
    model, model_choice = build_model(args, method, data)
    run = Run(args, accelerator, method, data, model, method.build_image_processor(), num_workers=num_workers,
              workers=workers, do_eval=do_eval, model_choice=model_choice)
    build_loaders(run)
    if args.do_train:
        run.plan = make_plan(run)
        build_optimization(run)
    prepare(run)
    method.setup(accelerator)  # frozen auxiliary networks to the device (never prepared, trained or saved)
    run.checkpoint_extras.update(method.checkpoint_state())
    accelerator.init_trackers(args.run_name, config=hyperparameters(args, dataloader_num_workers=num_workers,
                                                                    do_eval=do_eval, model_choice=model_choice))
    results = {}
    if args.do_train:
        resume(run)
        describe_run(run)
        with PreemptionGuard() as run.preemption:
            results.update(train(run))
    if run.do_eval:
        results.update(run.eval_results if run.eval_step == run.state.global_step else evaluate_and_log(run))
    write_results(run, results)  # first: a pushed repo carries them
    save_outputs(run, results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def size_of(dataset) -> str:
    return "streamed" if isinstance(dataset, datasets.IterableDataset) else ("-" if dataset is None else str(len(dataset)))


def describe_run(run: Run) -> None:
    plan, args, state = run.plan, run.args, run.state
    model = run.model_choice or args.model_name_or_path or args.config_name
    logger.info(
        "Training %s (model: %s, %.1fM parameters) for %d steps (%s steps/epoch), batch %d = %d per device x %d "
        "processes x %d accumulation, lr %.3g (%s), %d warmup steps, %s schedule; starting at step %d (epoch %d, "
        "batch %d).", run.method.name, model, sum(p.numel() for p in run.model.parameters()) / 1e6, plan.max_steps,
        plan.steps_per_epoch or "?", plan.total_batch_size,
        args.per_device_train_batch_size, run.accelerator.num_processes, args.gradient_accumulation_steps,
        plan.learning_rate, "explicit" if args.learning_rate is not None else f"blr {args.base_learning_rate:g} x batch/256",
        plan.warmup_steps, args.lr_scheduler_type, state.global_step, state.epoch, state.batch_in_epoch,
    )
    examples = run.train_examples
    if isinstance(examples, StreamedTrainingExamples):
        logger.info("Data: %s.", examples.describe(run.train_loader.fitted_workers()))
        examples = examples.make_example
    fast = fast_views(examples) is not None
    logger.info("Data: the %s pipeline, %s%s.", "fast" if fast else "reference", run.workers,
                f"; {examples.decoding}" if fast else "")


__all__ = ["LossMeter", "Plan", "Run", "evaluate", "run_training", "train"]
