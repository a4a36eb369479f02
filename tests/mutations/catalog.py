"""Realistic bugs the suite must catch, each a small textual patch of one source file.

``tests/test_mutations.py`` applies each mutation to a copy of the repository, runs its
``tests`` there and passes only if they fail (the mutation is killed). ``find`` must
occur exactly once in ``path``: when the code moves, the check fails loudly and the
entry here must be updated, so the list stays true.

Keep ``find`` short and on a stable line. ``tests`` are pytest node ids, relative to the
repository root; keep the selection small and the fast killer first (pytest runs with
``-x``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    find: str  # must occur exactly once in path
    replace: str
    tests: tuple[str, ...]
    bug: str  # what a user would see


SHARD = "property_tests/test_shard_properties.py"
RESUME = "property_tests/test_resume_properties.py"
ACC = "property_tests/test_accumulate_properties.py"
MP = "property_tests/test_mixed_precision_properties.py"
PURITY = "property_tests/test_purity_properties.py"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        name="zero2_reduce_scatters_only_the_first_bucket",
        path="backends/torch_native/data_parallel.py",
        find="        if self.scattered[i]:\n            self.works[i] = _reduce_scatter(",
        replace="        if self.scattered[i] and i == 0:\n            self.works[i] = _reduce_scatter(",
        tests=(f"{SHARD}::test_sgd_mean_loss_in_many_buckets_equals_single_process[zero2]",),
        bug="zero2: buckets after the first are all-reduced into the send buffer and never "
        "reduce-scattered; their gradient rows are garbage",
    ),
    Mutation(
        name="zero1_all_gathers_only_the_first_bucket",
        path="backends/torch_native/data_parallel.py",
        find="for entries, size in zip(plan.buckets, plan.ssizes):",
        replace="for entries, size in zip(plan.buckets[:1], plan.ssizes):",
        tests=(f"{SHARD}::test_sgd_mean_loss_in_many_buckets_equals_single_process[zero1]",),
        bug="zero1/zero2: the updated rows of buckets after the first never reach the other processes",
    ),
    Mutation(
        name="replicate_counts_every_gradient_into_the_first_bucket",
        path="backends/torch_native/data_parallel.py",
        find="        i = self.bucket_of[name]\n        self.filled[i] += 1",
        replace="        i = self.bucket_of[name]\n        self.filled[0] += 1",
        tests=(f"{SHARD}::test_sgd_mean_loss_in_many_buckets_equals_single_process[replicate]",),
        bug="replicate: a gradient is counted into the wrong bucket, so buckets after the first "
        "are never sent",
    ),
    Mutation(
        name="zero2_counts_every_gradient_into_the_first_bucket",
        path="backends/torch_native/data_parallel.py",
        find="self.filled[e.bucket] += 1",
        replace="self.filled[0] += 1",
        tests=(f"{SHARD}::test_sgd_mean_loss_in_many_buckets_equals_single_process[zero2]",),
        bug="zero2: a gradient is counted into the wrong bucket, so buckets after the first "
        "are never reduce-scattered",
    ),
    Mutation(
        name="gradient_sum_not_divided_by_world_size",
        path="backends/torch_native/common.py",
        find="return count * world",
        replace="return count",
        tests=(f"{SHARD}::test_sgd_mean_loss_in_many_buckets_equals_single_process[replicate]",),
        bug="shard: a plain mean loss's gradients are summed over the processes, not averaged "
        "(N times too large; AdamW and clipping hide it)",
    ),
    Mutation(
        name="item_count_not_summed_over_processes",
        path="backends/torch_native/common.py",
        find="        dist.all_reduce(t, group=group)\n",
        replace="",
        tests=(f"{SHARD}::test_masked_loss_in_many_buckets_equals_single_process[replicate]",),
        bug="shard: an xf.Mean loss is divided by this process's item count, not the global one",
    ),
    Mutation(
        name="zero_clip_norm_of_local_rows_only",
        path="xform/transforms/shard.py",
        find="self.squares = status[3] if squares is not None else None",
        replace="self.squares = squares",
        tests=(f"{SHARD}::test_clipped_sgd_equals_single_process[zero2]",),
        bug="zero1/zero2: gradient clipping uses the norm of this process's rows, not the whole gradient's",
    ),
    Mutation(
        name="load_keeps_likes_rng_key",
        path="xform/checkpoint.py",
        find='leaves[p] = saved[p]["value"]',
        replace='leaves[p] = ref if p == "rng" else saved[p]["value"]',
        tests=(f"{RESUME}::test_resume_in_process_equals_the_uninterrupted_run",),
        bug="xf.load: the RNG key comes from `like`, not from the checkpoint (dropout masks "
        "after a resume differ from the uninterrupted run's)",
    ),
    Mutation(
        name="loader_ignores_its_position",
        path="xform/data.py",
        find='index = state.data["consumed"]',
        replace="index = 0",
        tests=(f"{RESUME}::test_resume_in_process_equals_the_uninterrupted_run",),
        bug="DataLoader.iterate: a resumed run starts the epoch again instead of at the saved position",
    ),
    Mutation(
        name="accumulate_skips_micro_batches_after_the_first",
        path="xform/transforms/accumulate.py",
        find="torch._foreach_add_(self.grads, [grads[k] for k in self.names])",
        replace="pass",
        tests=(f"{ACC}::test_accumulate_equals_the_full_batch_step",),
        bug="accumulate: only the first micro-batch's gradients reach the update",
    ),
    Mutation(
        name="plain_mean_loss_not_divided_by_the_number_of_pieces",
        path="xform/core/primitives.py",
        find="seed = memo[key] = torch.ones_like(loss) / pieces",
        replace="seed = memo[key] = torch.ones_like(loss)",
        tests=(f"{ACC}::test_accumulate_with_sgd_equals_the_full_batch_step",),
        bug="accumulate/shard: a plain mean loss is summed over micro-batches (its backward starts "
        "from 1, not 1/k), k times too large a gradient (AdamW hides it)",
    ),
    Mutation(
        name="scaled_mean_loss_not_divided_by_the_number_of_pieces",
        path="xform/core/primitives.py",
        find="return total if pieces == 1 else total / pieces",
        replace="return total",
        tests=(f"{MP}::test_fp32_compute_with_a_power_of_two_loss_scale_is_bit_exact",),
        bug="accumulate/shard under a loss scale: the plain mean loss that a handler rescales is "
        "summed over micro-batches, k times too large a gradient",
    ),
    Mutation(
        name="micro_batch_metrics_summed_not_averaged",
        path="xform/transforms/accumulate.py",
        find="return total / len(xs) if x.is_floating_point()",
        replace="return total if x.is_floating_point()",
        tests=(f"{ACC}::test_accumulate_equals_the_full_batch_step",),
        bug="accumulate: the reported loss is the sum of the micro-batch losses",
    ),
    Mutation(
        name="dropout_stream_not_salted_per_micro_batch",
        path="xform/transforms/accumulate.py",
        find="rng.piece(i)",
        replace="rng.piece(0)",
        tests=(f"{PURITY}::test_each_micro_batch_draws_its_own_dropout_mask",),
        bug="accumulate: every micro-batch draws the same dropout mask",
    ),
    Mutation(
        name="loss_scale_never_grows",
        path="xform/transforms/mixed_precision.py",
        find="torch.where(grow, scale * self.factor, scale)",
        replace="scale",
        tests=(f"{MP}::test_fp16_dynamic_loss_scale_follows_its_definition",),
        bug="DynamicLossScale: the scale only ever shrinks, so fp16 gradients lose precision",
    ),
    Mutation(
        name="loss_scale_never_shrinks",
        path="xform/transforms/mixed_precision.py",
        find="torch.clamp(scale / self.factor, min=self.min_scale)",
        replace="scale",
        tests=(f"{MP}::test_fp16_dynamic_loss_scale_follows_its_definition",),
        bug="DynamicLossScale: an overflow does not lower the scale, so every later update is skipped",
    ),
    Mutation(
        name="data_ranks_share_one_slice",
        path="xform/data.py",
        find="chunk[rank * per : (rank + 1) * per]",
        replace="chunk[:per]",
        tests=("tests/test_data_dist.py::test_ranks_get_disjoint_slices_whose_union_is_the_single_process_batch",),
        bug="DataLoader: every process gets the first slice of the global batch",
    ),
    # --- bugs fixed by the numerics, ties and checkpoint work (issue 8), kept fixed ---------
    Mutation(
        name="nonfinite_update_not_skipped",
        path="xform/core/state.py",
        find="finite = not bool(bad)",
        replace="finite = True",
        tests=("tests/test_nonfinite.py::test_a_nan_loss_is_skipped_in_every_precision",),
        bug="apply_gradients: a NaN gradient reaches the params (every param NaN for good)",
    ),
    Mutation(
        name="nonfinite_flag_not_agreed_across_processes",
        path="xform/transforms/shard.py",
        find="status[0].copy_(bad)",
        replace="status[0].zero_()",
        tests=("tests/test_fp16_sharded.py::test_fp32_nan_on_one_rank_is_skipped_by_all_and_equals_one_process[zero2]",),
        bug="shard: a NaN in one process's gradient rows is not shared, so every process updates with it",
    ),
    Mutation(
        name="fsdp_unit_splits_a_tie",
        path="backends/torch_native/fully_shard.py",
        find="return any(0 < sum(_inside(o, unit) for o in tie) < len(tie) for tie in tied)",
        replace="return False",
        tests=("tests/test_tied.py::test_tied_weights_under_every_strategy_equal_the_single_process_step[zero3-None]",),
        bug="zero3: each module holding a tied weight becomes its own FSDP unit (GPT-2 crashed with KeyError 'lm_head.weight')",
    ),
    Mutation(
        name="checkpoint_checksum_not_verified",
        path="xform/checkpoint.py",
        find="if sums is not None and (got := _crc_tensor(src)) != sums[p]:",
        replace="if False and (got := _crc_tensor(src)) != sums[p]:",
        tests=("tests/test_checkpoint.py::test_a_flipped_bit_in_the_tensor_file_is_detected_and_named",),
        bug="xf.load: a corrupted tensor file loads silently with wrong values",
    ),
    Mutation(
        name="zero_update_does_not_call_next",
        path="xform/transforms/shard.py",
        find="        with sharded_update(self):\n            return next(state, grads)",
        replace="        if self.zero is not None:\n"
        "            return state.successor(updated=True, opt_state=self.zero.optimizer_update(state, grads, None))\n"
        "        with sharded_update(self):\n            return next(state, grads)",
        tests=("tests/test_fp16_sharded.py::test_fp16_overflow_on_one_rank_is_skipped_by_all_and_equals_one_process[zero2]",),
        bug="mixed_precision(shard(f, 'zero2'), 'fp16'): shard runs the optimizer itself, so the loss "
        "scale's unscale and skip never run (weights off by the scale after one step)",
    ),
    Mutation(
        name="stream_worker_serves_every_batch",
        path="xform/_data_stream.py",
        find="if (index - self.start) % n == w:",
        replace="if True:",
        tests=("tests/test_data_stream.py::test_workers_give_the_batches_of_the_main_process_and_resume_exactly",),
        bug="DataLoader over an IterableDataset with workers: every worker serves every batch, so each batch arrives n times",
    ),
    Mutation(
        name="stream_ranks_share_one_slice",
        path="xform/_data_stream.py",
        find="mine = padded[self.rank * per : (self.rank + 1) * per]",
        replace="mine = padded[:per]",
        tests=("tests/test_data_stream.py::test_ranks_get_disjoint_slices_whose_union_is_the_single_process_batch",),
        bug="DataLoader over an IterableDataset: every rank gets the first slice of each global batch",
    ),
    Mutation(
        name="unused_parameter_loses_the_earlier_sums",
        path="backends/torch_native/data_parallel.py",
        find="        for earlier in self.sums:  # in order, innermost accumulate first",
        replace="        for earlier in ():  # in order, innermost accumulate first",
        tests=("tests/test_hostile.py::test_an_expert_used_only_by_an_earlier_micro_batch_keeps_its_gradient[zero2]",),
        bug="shard(accumulate(f)) under zero2: the last micro-batch's gradients, and a parameter it does not "
        "use (a routed expert), are sent without the earlier micro-batches' sums",
    ),
    Mutation(
        name="one_bucket_sent_without_the_earlier_sums",
        path="backends/torch_native/data_parallel.py",
        find="            for earlier in self.sums:\n                torch._foreach_add_(views",
        replace="            for earlier in ():\n                torch._foreach_add_(views",
        tests=("tests/test_hostile.py::test_an_expert_used_only_by_an_earlier_micro_batch_keeps_its_gradient[replicate]",),
        bug="shard(accumulate(f)) on a model of one bucket: the last micro-batch's gradient is sent "
        "without the earlier micro-batches' sums",
    ),
    Mutation(
        name="jit_update_reaches_params_on_a_nan_batch",
        path="xform/core/state.py",
        find="p.copy_(torch.where(ok, w, p))",
        replace="p.copy_(w)",
        tests=("tests/test_jit.py::test_jitted_step_equals_the_eager_step_bit_for_bit[plain]",),
        bug="xf.jit: the select that replaces the host read keeps the update of a non-finite "
        "gradient, so a NaN batch writes NaN into the params",
    ),
    Mutation(
        name="pipeline_micro_batch_loss_not_divided",
        path="backends/torch_native/pipeline.py",
        find="return loss.reshape(()) / pieces",
        replace="return loss.reshape(())",
        tests=("tests/test_pipeline.py::test_pp2_equals_the_single_process_step[gpipe]",),
        bug="Pipeline: each micro-batch's mean loss is not divided by the number of micro-batches, "
        "so the gradient is M times too large",
    ),
    Mutation(
        name="deepspeed_accumulation_not_in_its_config",
        path="backends/deepspeed/config.py",
        find='generated["gradient_accumulation_steps"] = (settings.accumulation, acc_source)',
        replace='generated["gradient_accumulation_steps"] = (1, acc_source)',
        tests=("tests/test_deepspeed.py::test_config_is_generated_from_the_transforms",),
        bug="xf.DeepSpeed under accumulate(k): the engine steps after every micro-batch instead of every k",
    ),
    Mutation(
        name="direct_update_drops_adamw_decoupled_decay",
        path="xform/core/optim.py",
        find='decoupled_weight_decay=group["decoupled_weight_decay"]',
        replace="decoupled_weight_decay=False",
        tests=("tests/test_optim_direct.py::test_direct_update_is_optimizer_step_bit_for_bit[adamw]",),
        bug="AdamW through the direct update runs as Adam with L2 decay (AdamW is Adam with a flag in torch): "
        "from the second step on, weight decay enters the moments",
    ),
    Mutation(
        name="direct_update_reads_the_schedule_once",
        path="xform/core/optim.py",
        find='lr=group["lr"], dampening=group["dampening"]',
        replace='lr=0.1, dampening=group["dampening"]',  # the schedule's first value, kept
        tests=("tests/test_optim_direct.py::test_direct_update_reads_the_schedule_and_clipping_each_step",),
        bug="SGD through the direct update keeps the learning rate of its first update: the schedule stops",
    ),
    Mutation(
        name="backward_start_reused_after_a_backward_wrote_into_it",
        path="xform/core/primitives.py",
        find="if seed is not None and seed._version:",
        replace="if False:",
        tests=("tests/test_accumulate.py::test_a_backward_that_writes_into_its_incoming_gradient_does_not_leak_into_the_next_micro_batch",),
        bug="accumulate: a custom backward that scales its incoming gradient in place changes the cached "
        "start of every later micro-batch and step",
    ),
    Mutation(
        name="leaf_loss_gets_the_shared_backward_start",
        path="xform/core/primitives.py",
        find="if loss.grad_fn is None or torch.compiler.is_compiling():",
        replace="if torch.compiler.is_compiling():",
        tests=("tests/test_accumulate.py::test_a_loss_that_is_a_parameter_itself_accumulates_right_on_every_call",),
        bug="accumulate: a loss that is its own input gets the cached start back as its gradient, and "
        "the sum of the micro-batches is added into it: later steps start from a wrong value",
    ),
    Mutation(
        name="loss_value_aliases_the_parameter",
        path="xform/core/primitives.py",
        find="return loss.grad_fn is None or loss._is_view()",
        replace="return False",
        tests=("tests/test_primitives.py::test_the_loss_value_is_the_one_before_the_update",),
        bug="a loss that is a parameter (or a view of one) is reported after the update changed it in place",
    ),
    Mutation(
        name="stream_readers_write_the_shared_epoch",
        path="xform/_data_stream.py",
        find="dataset = own_epoch(self.dataset)",
        replace="dataset = self.dataset",
        tests=("tests/test_data_hf.py::test_readers_never_write_the_epoch_a_streaming_dataset_shares_with_its_workers",),
        bug="Hugging Face streaming datasets: the loader's workers race on the one shared epoch "
        "(a shuffle of another epoch, or a negative epoch that numpy refuses)",
    ),
    Mutation(
        name="a_wrapper_of_a_mixed_precision_step_taken_for_it",
        path="xform/core/transform.py",
        find="if found is None or found[0] is not step:",
        replace="if found is None:",
        tests=("tests/test_accumulate.py::test_a_function_wrapping_a_mixed_precision_step_still_runs_on_every_micro_batch",),
        bug="accumulate: a function made with functools.wraps around a mixed_precision step is skipped "
        "(its copied attribute taken for the step's own) and the step runs without it",
    ),
    Mutation(
        name="nested_apply_shares_the_reused_autocast",
        path="xform/transforms/mixed_precision.py",
        find="ac is None or self.depth or ac.device != device_type",
        replace="ac is None or ac.device != device_type",
        tests=("tests/test_mixed_precision.py::test_an_apply_nested_in_another_leaves_autocast_as_it_found_it",),
        bug="mixed_precision: an apply nested in another re-enters the one reused autocast context, "
        "which then restores the wrong settings and leaves autocast on after the step",
    ),
    Mutation(
        name="accumulate_of_mixed_precision_drops_the_policy",
        path="xform/transforms/accumulate.py",
        find="call if commuted is None else commuted[1](call)",
        replace="call",
        tests=("tests/test_accumulate.py::test_accumulate_of_mixed_precision_runs_the_policy_once_per_step_outside_accumulate",),
        bug="accumulate(mixed_precision(s)) rewritten to run the inner step without the policy's handler: "
        "fp32 compute where bf16 was asked for",
    ),
    Mutation(
        name="innermost_handler_rescaling_ignored",
        path="xform/core/primitives.py",
        find="for h in handlers)  # overrides objective",
        replace="for h in handlers[:-1])  # overrides objective",
        tests=(f"{MP}::test_both_nesting_orders_are_equal",),
        bug="a loss-scaling handler innermost in the stack (fp16 inside accumulate, hidden from the "
        "rewrite) is taken not to rescale: the loss goes unscaled and the update is divided by the scale",
    ),
    Mutation(
        name="bucket_reused_while_a_kept_gradient_views_it",
        path="backends/torch_native/data_parallel.py",
        find="if uses < 0 or uses != self.uses[i]:",
        replace="if uses < 0:",
        tests=("tests/test_shard.py::test_gradients_a_step_returned_are_not_overwritten_by_the_next_step",),
        bug="replicate/zero: the gradients a step returned (kept by the caller) are overwritten by the "
        "next step's, which reuses the bucket they view",
    ),
    Mutation(
        name="gradient_buckets_allocated_every_step",
        path="backends/torch_native/data_parallel.py",
        find="if uses < 0 or uses != self.uses[i]:",
        replace="if True:",
        tests=("tests/test_shard.py::test_the_buckets_are_reused_unless_a_gradient_is_kept",),
        bug="replicate/zero: every step allocates its gradient buckets afresh (on CPU, a page fault "
        "per page of a large bucket, each step)",
    ),
    Mutation(
        name="bucket_hook_ignores_the_earlier_sums",
        path="backends/torch_native/data_parallel.py",
        find="        if self.sums:\n            torch.add(g, self.sums[0][name], out=view)",
        replace="        if False:\n            torch.add(g, self.sums[0][name], out=view)",
        tests=("tests/test_shard.py::test_accumulated_sums_reach_the_all_reduce_alike_with_or_without_hooks",),
        bug="shard(accumulate(step, k)) over several buckets: the hooks send the last micro-batch's "
        "gradient without the earlier micro-batches' sums",
    ),
    Mutation(
        name="folded_sums_applied_again",
        path="xform/transforms/accumulate.py",
        find="        self.folded = True\n        return dict(zip(self.names, self.grads))",
        replace="        return dict(zip(self.names, self.grads))",
        tests=("tests/test_shard.py::test_accumulated_sums_reach_the_all_reduce_alike_with_or_without_hooks",),
        bug="shard(accumulate(step, k)) on a model of one bucket: the earlier micro-batches' sums, already "
        "added before the all-reduce, are added again by accumulate",
    ),
    Mutation(
        name="bf16_weight_casts_kept_past_the_update",
        path="xform/transforms/mixed_precision.py",
        find="            torch.clear_autocast_cache()  # casts of the weights the update is about to change",
        replace="            pass",
        tests=("tests/test_mixed_precision.py::test_an_apply_after_the_update_sees_the_new_weights_not_stale_casts",),
        bug="bf16: an apply after the update in the same step computes with the casts of the old weights",
    ),
    Mutation(
        name="bf16_weights_cast_again_each_micro_batch",
        path="xform/transforms/mixed_precision.py",
        find="            keep = not handler.cast_inputs and not torch.compiler.is_compiling()",
        replace="            keep = False",
        tests=("tests/test_mixed_precision.py::test_bf16_casts_each_weight_once_per_step_not_once_per_micro_batch",),
        bug="accumulate(mixed_precision(step, 'bf16'), k): every weight is cast to bf16 k times per step "
        "instead of once",
    ),
    Mutation(
        name="bf16_step_leaks_an_autocast_nesting_level",
        path="xform/transforms/mixed_precision.py",
        find="                        if torch.autocast_decrement_nesting() == 0:\n                            torch.clear_autocast_cache()",
        replace="                        pass",
        tests=("tests/test_mixed_precision.py::test_a_step_leaves_autocast_nesting_as_it_found_it",),
        bug="bf16: every step leaves autocast one nesting level deeper, so the caller's own autocast "
        "regions never drop their cached casts again",
    ),
)
