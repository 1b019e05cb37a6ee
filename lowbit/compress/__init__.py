"""The compress pipeline (`lowbit.compress`, the function, is `lowbit.compress.api.compress`).

`dry_run` (`lowbit.compress.preflight`) plans a job from the model's config and shapes alone.
"""

from lowbit.compress.preflight import DryRun, dry_run

__all__ = ["DryRun", "dry_run"]
