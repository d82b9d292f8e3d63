"""The model-bearing rules: language identification and the CLIP score, loaded once per actor.

Run inside every Ray worker process, the models load once per process: a 64-CPU node would hold 64
copies of lingua's models (0.5-1 GB each) and of the CLIP-score bundle. With
`FilterConfig.model_actors_per_node` > 0 they live in a pool of Ray actors instead, that many on each
node, each loading them once; an analyse task sends a whole unit's captions (and images) in one call to
an actor on its own node (another node's when its own has none or lost it, its own process as the last
resort). With 0, and with `runner="local"`, they run in the calling process (loaded once per process).
The answers do not depend on where they ran.
"""

from __future__ import annotations

import io
import tempfile

from components.common import storage
from components.filter.config import FilterConfig
from components.filter.langid import Decision, identifier

_CLIP_CACHE: dict[str, object] = {}


def _onnx_clip(bundle: str):
    """One OnnxClip per process and bundle (downloaded first when the bundle is on S3)."""
    if bundle not in _CLIP_CACHE:
        from components.inference.onnx_clip import OnnxClip, fetch_remote_bundle

        local = fetch_remote_bundle(bundle, tempfile.mkdtemp(prefix="clip-bundle-")) if storage.is_s3(bundle) else bundle
        _CLIP_CACHE[bundle] = OnnxClip(local, intra_op_threads=1)
    return _CLIP_CACHE[bundle]


class ModelRules:
    """The models of one process (an actor's, or the caller's)."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg

    def languages(self, captions: list[str]) -> list[Decision]:
        ident = identifier(self.cfg.language_identifier, self.cfg.language_confident_score, self.cfg.languages)
        return [ident.decide(c) for c in captions]

    def clip_scores(self, images: list[bytes], captions: list[str]) -> list[float]:
        """Cosine similarity of each image and its caption under the ONNX bundle `cfg.clip_bundle`."""
        from PIL import Image

        model, size = _onnx_clip(self.cfg.clip_bundle), self.cfg.clip_batch_size
        out: list[float] = []
        for s in range(0, len(images), size):
            batch = [Image.open(io.BytesIO(b)) for b in images[s:s + size]]  # RGB as serving makes it
            img = model.encode_images(batch)
            txt = model.encode_texts(captions[s:s + size])
            out += [float(x) for x in (img * txt).sum(axis=1)]
        return out

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class Models:
    """What an analyse task calls: the actor pool ({node id: actor handles}) or, without one, its own process."""

    def __init__(self, cfg: FilterConfig, pool: dict[str, list] | None = None) -> None:
        self.cfg, self.pool = cfg, pool or {}

    def languages(self, captions: list[str], salt: int = 0) -> list[Decision]:
        return self._call("languages", salt, captions) if captions else []

    def clip_scores(self, images: list[bytes], captions: list[str], salt: int = 0) -> list[float]:
        return self._call("clip_scores", salt, images, captions) if images else []

    def _call(self, method: str, salt: int, *args):
        if self.pool:
            import ray
            from ray.exceptions import RayActorError

            here = ray.get_runtime_context().get_node_id()
            own = self.pool.get(here, [])
            others = [h for node, handles in sorted(self.pool.items()) if node != here for h in handles]
            k = salt % len(own) if own else 0
            for handle in own[k:] + own[:k] + others:
                try:
                    return ray.get(getattr(handle, method).remote(*args))
                except RayActorError:  # its node is gone: the next one
                    continue
        return getattr(ModelRules(self.cfg), method)(*args)


def start_pool(cfg: FilterConfig) -> dict[str, list]:
    """`cfg.model_actors_per_node` model actors on each alive node with CPUs (none when 0). The actors
    reserve no CPU: the task that calls one waits for it, so the work stays within the task's CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if cfg.model_actors_per_node <= 0:
        return {}
    actor = ray.remote(num_cpus=0)(ModelRules)
    pool: dict[str, list] = {}
    for node in ray.nodes():
        if node.get("Alive") and node.get("Resources", {}).get("CPU"):
            pin = NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
            pool[node["NodeID"]] = [actor.options(scheduling_strategy=pin).remote(cfg)
                                    for _ in range(cfg.model_actors_per_node)]
    return pool
