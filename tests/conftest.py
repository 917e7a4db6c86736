"""Shared fixtures: every test fails if it leaves a gradwatch hook behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.modules.module as module_hooks
import torch.optim.optimizer as optimizer_hooks

# The test models are tiny: one intra-op thread runs them fastest and keeps
# parallel test processes from oversubscribing the cores.
torch.set_num_threads(1)

_GLOBAL_HOOK_DICTS = {
    "optimizer step pre-hooks": optimizer_hooks._global_optimizer_pre_hooks,
    "optimizer step post-hooks": optimizer_hooks._global_optimizer_post_hooks,
    "module registration hooks": module_hooks._global_module_registration_hooks,
    "parameter registration hooks": module_hooks._global_parameter_registration_hooks,
    "module forward pre-hooks": module_hooks._global_forward_pre_hooks,
    "module forward hooks": module_hooks._global_forward_hooks,
    "module backward hooks": module_hooks._global_backward_hooks,
}


@pytest.fixture(autouse=True)
def _no_global_hooks_left():
    before = {name: len(hooks) for name, hooks in _GLOBAL_HOOK_DICTS.items()}
    yield
    after = {name: len(hooks) for name, hooks in _GLOBAL_HOOK_DICTS.items()}
    leaked = {
        name: after[name] - before[name]
        for name in before
        if after[name] > before[name]
    }
    assert not leaked, f"global torch hooks left registered after the test: {leaked}"
