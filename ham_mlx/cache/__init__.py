"""Per-layer inference caches, batched and following mlx-lm 0.32's cache protocol (spec §7).

- `GDNCache`  (gdn layers): the last Kc-1 conv inputs and the recurrent state S per row.
- `AttnCache` (attn layers): keys (after RoPE) and values per row; trimmable.
- `HAMCache`  (ham layers): a GDN cache plus the admitted keys/values with positions and scores,
  and the `Admission` policy that owns τ and the capacity.

Every cache supports `state`/`from_state`, `prepare`/`finalize`/`make_mask` (padding),
`merge`/`extend`/`filter`/`extract` (batches), `empty`, `nbytes`, `size`, `is_trimmable`/`trim`.
"""

from ham_mlx.admission import KV_POLICIES
from ham_mlx.cache import mlx_lm_hook
from ham_mlx.cache.attention import AttnCache
from ham_mlx.cache.checks import CacheStateError
from ham_mlx.cache.files import (
    CACHE_CLASSES,
    PromptCacheError,
    check_against_model,
    load_prompt_cache,
    save_prompt_cache,
)
from ham_mlx.cache.ham import HAMCache
from ham_mlx.cache.recurrent import GDNCache
from ham_mlx.cache.stats import kv_stats

mlx_lm_hook.install()

__all__ = [
    "AttnCache", "CACHE_CLASSES", "CacheStateError", "GDNCache", "HAMCache", "KV_POLICIES",
    "PromptCacheError", "check_against_model", "kv_stats", "load_prompt_cache",
    "save_prompt_cache",
]  # fmt: skip
