"""Model registry and safe, checksum-verified weight files.

A weights file is a ``torch.save`` of plain containers (no pickled classes) so it loads with
``weights_only=True``::

    {"format": "brainunet-weights", "version": 1, "name": str, "network": NetworkConfig dict,
     "preprocessing": {...}, "postprocessing": {...}, "extra": {...}, "state_dict": {name: fp16/fp32 tensor}}

(the settings dicts, with an optional ``"postprocessing_missing"``, are ``settings.ModelSettings``).

The bundled registry (``models/registry.json``, in the read-only install tree) lists each model with
its file, SHA-256 and an optional download URL; the URL is only used when the file is absent and is
verified like a local file. Models a user registers, and weights downloaded later, live in a per-user
folder (``user_models_dir``: ``$BRAINUNET_HOME/models``, else the platform's user data folder): the install
tree is never written (it is read-only in a signed macOS bundle and replaced on every update).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Cancelled, InputError, WeightsError
from .settings import ModelSettings

MODELS_DIR = Path(__file__).resolve().parent / "models"
REGISTRY_PATH = MODELS_DIR / "registry.json"


def user_models_dir(home: str | Path | None = None) -> Path:
    """Per-user folder for registered and downloaded models: under ``home``, else ``$BRAINUNET_HOME``, else the
    platform's user data folder. Inside Slicer the bridge gives the worker a home next to Slicer's user
    settings, as the anchors keep their models in the user's home."""
    home = home or os.environ.get("BRAINUNET_HOME")
    if home:
        return Path(home) / "models"
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("BrainUNet", appauthor=False)) / "models"
    except ImportError:
        return Path.home() / ".brainunet" / "models"


def user_registry_path(home: str | Path | None = None) -> Path:
    return user_models_dir(home) / "registry.json"


WEIGHTS_FORMAT = "brainunet-weights"
#: The newest weights file layout this runtime reads.
WEIGHTS_VERSION = 1

@dataclass
class ModelEntry:
    name: str
    kind: str  # "network" (a BrainUNet weights file) or "baseline" (the intensity rule)
    description: str
    file: str | None = None  # relative to the registry folder, or absolute
    sha256: str | None = None
    url: str | None = None
    extra: dict = field(default_factory=dict)
    base_dir: Path | None = None  # the folder of the registry that lists it (relative files live there)
    # the user's models folder it was listed with (None: this process's, ``user_models_dir()``): the
    # Slicer process lists the worker's models, whose home is not its own
    user_dir: Path | None = None

    def _listed(self, registry_dir: Path | None) -> Path:
        p = Path(self.file)
        return p if p.is_absolute() else Path(registry_dir or self.base_dir or MODELS_DIR) / p

    def download_target(self, registry_dir: Path | None = None) -> Path:
        """Where a download of the weights goes: the user's folder when the registry lists them in the
        (read-only) install tree, else where the registry lists them."""
        listed = self._listed(registry_dir)
        if listed.resolve().is_relative_to(MODELS_DIR):
            return Path(self.user_dir or user_models_dir()) / listed.name
        return listed

    def path(self, registry_dir: Path | None = None) -> Path | None:
        """Where the weights are: where the registry lists them, or where they were downloaded to."""
        if self.file is None:
            return None
        listed = self._listed(registry_dir)
        downloaded = self.download_target(registry_dir)
        return downloaded if not listed.exists() and downloaded.exists() else listed


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MODEL_KINDS = ("network", "baseline")


def load_registry(path: Path | None = None, user_registry: Path | None = None) -> list[ModelEntry]:
    """The entries of one registry file, or (``path`` None) the user's registered models first (from
    ``user_registry``, default ``user_registry_path()``), then the bundled ones (a user entry of the same
    name wins)."""
    if path is None:
        user_registry = Path(user_registry) if user_registry else user_registry_path()
        user = load_registry(user_registry) if user_registry.is_file() else []
        names = {e.name for e in user}
        entries = user + [e for e in load_registry(REGISTRY_PATH) if e.name not in names]
        for e in entries:
            e.user_dir = user_registry.parent
        return entries
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"The model registry {path} cannot be read ({exc}); {_registry_advice(path)}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    # a hand-edited file: every entry must name a model and say what kind it is, or it cannot be run
    if not isinstance(models, list) or not all(
            isinstance(d, dict) and isinstance(d.get("name"), str) and d["name"].strip()
            and isinstance(d.get("kind"), str) and d["kind"].strip()
            and all(isinstance(d.get(k), (str, type(None))) for k in ("file", "description", "sha256", "url"))
            for d in models):
        raise WeightsError(f"The model registry {path} is not a list of models (each with a name and a kind, "
                           f"such as network or baseline); {_registry_advice(path)}")
    entries, unknown = [], []
    for d in models:
        if d["kind"] not in MODEL_KINDS:  # added by a newer BrainUNet sharing this folder: the others stay usable
            unknown.append(d["name"])
            continue
        known = {k: d[k] for k in ("name", "kind", "description", "file", "sha256", "url") if k in d}
        known.setdefault("description", "")
        extra = {k: v for k, v in d.items() if k not in known}
        entries.append(ModelEntry(**known, extra=extra, base_dir=path.parent))
    if unknown:
        logging.getLogger(__name__).warning(
            "%s: model(s) %s are of a kind this BrainUNet does not know (a newer version registered them); they "
            "are left out here. Update BrainUNet to use them.", path, ", ".join(unknown))
    return entries


def _registry_advice(path: Path) -> str:
    if Path(path).resolve() == REGISTRY_PATH.resolve():
        return "reinstall BrainUNet."
    return ("remove that file (the models registered by you are then forgotten; register them again with "
            "brainunet register).")


def check_user_model_name(name: str) -> None:
    """A model the user adds may not take the name of one that comes with BrainUNet: it would hide it."""
    if name in {e.name for e in load_registry(REGISTRY_PATH)}:
        raise InputError(f"'{name}' is the name of a model that comes with BrainUNet; choose another name.")


def _restore(entry: ModelEntry) -> str:
    """How to bring back a model whose weights file is gone: a bundled one comes with BrainUNet, a user's
    one from the file it was registered from (a reinstall keeps the user's registry, and the entry)."""
    if entry.base_dir is None or Path(entry.base_dir).resolve() == MODELS_DIR.resolve():
        return "Reinstall BrainUNet"
    return (f"Register its file again (brainunet register FILE --name {entry.name} --replace; in Slicer, Add model "
            f"file...) or remove '{entry.name}' from {Path(entry.base_dir) / 'registry.json'}")


def default_model(entries: list[ModelEntry] | None = None, registry_dir: Path | None = None) -> ModelEntry:
    """``$BRAINUNET_MODEL`` if set (a registry name), else the first registered network. Its weights must
    be present or downloadable: a missing weights file is an error (exit 3), never a silent switch to
    the intensity rule, which runs only when asked for by name."""
    entries = load_registry() if entries is None else entries
    chosen = os.environ.get("BRAINUNET_MODEL")
    if chosen:
        return find_model(chosen, entries)
    for e in entries:
        if e.kind == "network":
            path = e.path(registry_dir)
            if path is not None and not path.exists() and not e.url:
                raise WeightsError(f"The weights of the default model '{e.name}' are missing ({path}). {_restore(e)}"
                                   ", or pass --model with a weights file (--model intensity-baseline runs "
                                   "the transparent intensity rule, which is not a trained network).")
            return e
    raise WeightsError("No trained model is registered: reinstall BrainUNet, or pass --model with a weights file "
                       "(--model intensity-baseline runs the transparent intensity rule).")


@dataclass
class ResolvedModel:
    """What ``--model`` names: a registry entry or a weights file, with the settings its entry adds."""
    name: str
    kind: str  # "network" or "baseline"
    path: Path | None  # the weights file (None for the baseline)
    sha256: str | None  # expected checksum (registry entries only)
    settings: dict  # the registry entry's overrides of the stored settings (flat: ModelSettings.flat() keys)
    description: str
    from_file: bool = False  # named by a file path, not by the registry


def resolve_model(model=None, progress=None) -> ResolvedModel:
    """The one place a model argument is resolved: None (the default model), a registry name, or a path
    to a weights file (anything ending in .pt / .pth, or an existing path). Registry weights are
    fetched if they are missing and downloadable."""
    if model is not None and (str(model).endswith((".pt", ".pth")) or Path(str(model)).exists()):
        path = Path(model)
        if path.is_dir():
            raise WeightsError(f"--model {model} is a folder; give a weights file (.pt), e.g. {path / 'model.pt'}, "
                               "or a registered model name (brainunet models).")
        if not path.is_file():
            raise WeightsError(f"Weights file not found: {path}.")
        return ResolvedModel(path.stem, "network", path, None, {}, f"weights file {path}", from_file=True)
    entry = find_model(str(model)) if model else default_model()
    if entry.kind == "baseline":
        return ResolvedModel(entry.name, "baseline", None, None, {}, entry.description)
    return ResolvedModel(entry.name, "network", ensure_weights(entry, progress=progress), entry.sha256,
                         dict(entry.extra.get("settings", {})), entry.description)


def find_model(name: str, entries: list[ModelEntry] | None = None) -> ModelEntry:
    entries = load_registry() if entries is None else entries
    for e in entries:
        if e.name == name:
            return e
    raise WeightsError(f"Unknown model '{name}'. Known models: {', '.join(e.name for e in entries)}.")


def download(url: str, destination: Path, sha256: str | None, progress=None, what: str = "model weights") -> Path:
    """Fetch ``url`` to ``destination`` atomically and verify its checksum (file:// works offline)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=destination.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if progress and total:
                    progress(done / total, f"Downloading {what} ({done >> 20} / {total >> 20} MB)")
        if sha256 and sha256_of(Path(tmp)) != sha256:
            raise WeightsError(f"The download of the {what} from {url} does not match the expected checksum (a "
                               "broken or changed download); nothing was kept. Try again later.")
        os.replace(tmp, destination)
    except WeightsError:
        raise
    except OSError as exc:
        raise WeightsError(f"Could not download the {what} from {url}: {exc}. "
                           "Check the internet connection, or copy the file to "
                           f"{destination} by hand.") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return destination


def ensure_weights(entry: ModelEntry, registry_dir: Path | None = None, progress=None) -> Path:
    path = entry.path(registry_dir)
    if path is None:
        raise WeightsError(f"Model '{entry.name}' has no weights file.")
    if not path.exists():
        if not entry.url:
            raise WeightsError(f"Weights file for model '{entry.name}' is missing: {path}. {_restore(entry)}, "
                               "or pass --model with the path to a weights file.")
        path = download(entry.url, entry.download_target(registry_dir), entry.sha256, progress)
    return path


def save_weights(path: Path, model, name: str, settings: ModelSettings | None = None, half: bool = True,
                 extra: dict | None = None) -> str:
    """Write a compact (fp16 by default) weights file; returns its SHA-256."""
    import torch

    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "name": name,
        "network": model.config.to_dict(),
        **(settings or ModelSettings()).to_stored(),
        "extra": extra or {},
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return sha256_of(path)


def load_weights(path: Path, expected_sha256: str | None = None, device: str = "cpu"):
    """Return ``(model, payload)``; the model is in eval mode, fp32, on ``device``."""
    import torch

    from .network import BrainUNet, NetworkConfig

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}.")
    if expected_sha256 and sha256_of(path) != expected_sha256:
        raise WeightsError(f"Weights file {path} is corrupt (checksum mismatch). A model that came with "
                           "BrainUNet: reinstall BrainUNet or download the file again; a model you added: register "
                           "its file again (brainunet register FILE --name NAME --replace; in Slicer, Add model "
                           "file...).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Cancelled:  # SIGTERM (Slicer's Cancel) raised while reading: a cancel, not a corrupt file
        raise
    except Exception as exc:  # truncated zip, pickle refused by weights_only, ...
        raise WeightsError(f"Weights file {path} cannot be read ({type(exc).__name__}); it is corrupt, "
                           "truncated or not a BrainUNet weights file.") from exc
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{path} is not a BrainUNet weights file.")
    version = payload.get("version", 1)
    if not isinstance(version, int) or version > WEIGHTS_VERSION:
        raise WeightsError(f"Weights file {path} was written by a newer BrainUNet (format version {version}; this "
                           f"one reads up to {WEIGHTS_VERSION}). Update BrainUNet (the Slicer extension, or pip "
                           "install -U).")
    try:
        model = BrainUNet(NetworkConfig.from_dict(payload["network"]))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in payload["state_dict"].items()})
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise WeightsError(f"Weights file {path} does not match the BrainUNet network: {exc}") from exc
    payload.update(ModelSettings.from_stored(payload, source=str(path)).to_stored())
    return model.to(device).eval(), payload


def register_model(weights_file: Path, name: str, description: str = "", settings: dict | None = None,
                   registry_path: Path | None = None, fields: dict | None = None) -> ModelEntry:
    """Install a trained weights file in the user's registry (or ``registry_path``) as ``<registry
    folder>/<name>.pt``, first in the list (so it becomes the default), with ``settings`` overriding its
    preprocessing / post-processing options (e.g. ``fill_core_holes``). Replaces an entry of the same name.
    The entry says which inputs the model needs (the panel's information box shows them); ``fields`` adds
    others (``accuracy``, ``licence``)."""
    registry_path = Path(registry_path) if registry_path else user_registry_path()
    if registry_path.exists():
        load_registry(registry_path)  # one that cannot be read is reported, not overwritten
    _, payload = load_weights(Path(weights_file))
    try:
        registry_path.parent.mkdir(parents=True, exist_ok=True)
        return _register(payload, registry_path, name, description, settings, fields)
    except OSError as exc:
        raise WeightsError(f"The model cannot be written into {registry_path.parent} ({exc.strerror or exc}); free "
                           "some space there, or set BRAINUNET_HOME to a folder you may write to.") from exc


def _register(payload: dict, registry_path: Path, name: str, description: str, settings: dict | None,
              fields: dict | None) -> ModelEntry:
    import torch

    model_settings = ModelSettings.from_stored(payload, settings, source=f"model '{name}'")
    payload.update(model_settings.to_stored())
    payload["name"] = name
    target = Path(registry_path).parent / f"{name}.pt"
    # written beside it first and moved in just before the registry: a run stopped while the weights are
    # written leaves a model of the same name as it was
    handle, staged = tempfile.mkstemp(prefix=f".{name}-", suffix=".pt.tmp", dir=target.parent)
    os.close(handle)
    staged = Path(staged)
    try:
        torch.save(payload, staged)
        entry = {"name": name, "kind": "network", "description": description or f"BrainUNet weights {name}",
                 "file": target.name, "sha256": sha256_of(staged)}
        if settings:
            entry["settings"] = dict(settings)  # stored in the weights too; here so that `brainunet models` shows them
        entry["inputs"] = {"sequences": list(model_settings.preprocessing.modalities),
                           "one_may_be_missing": model_settings.preprocessing.modality_dropout}
        entry.update(fields or {})
        with registry_lock(registry_path):  # two registrations at once: each keeps the other's entry
            registry = {"models": []}
            if registry_path.exists():
                with open(registry_path, encoding="utf-8") as f:
                    registry = json.load(f)
            # Windows' and macOS' file systems ignore case: Clinic.pt and clinic.pt are one file
            clash = [m.get("name") for m in registry["models"]
                     if m.get("name") != name and str(m.get("name")).casefold() == name.casefold()]
            if clash:
                raise WeightsError(f"A model named '{clash[0]}' is already registered ({registry_path}); names that "
                                   "differ only in upper and lower case share one file on Windows and macOS. "
                                   f"Choose another name, or replace it under the name '{clash[0]}'.")
            registry["models"] = [entry] + [m for m in registry["models"] if m.get("name") != name]
            os.replace(staged, target)
            write_registry(registry_path, registry)
    finally:
        staged.unlink(missing_ok=True)
    return load_registry(registry_path)[0]


@contextlib.contextmanager
def registry_lock(registry_path: Path, wait_s: float = 30.0, stale_s: float = 120.0):
    """Hold ``<registry>.lock`` (created exclusively) while a registry is read, changed and written. A lock
    older than ``stale_s`` is that of a process that died holding it: taken over."""
    lock = Path(str(registry_path) + ".lock")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > stale_s:
                    lock.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:  # released meanwhile
                continue
            if time.monotonic() > deadline:
                raise WeightsError(f"{registry_path} is being changed by another BrainUNet for over {wait_s:.0f} s; "
                                   f"try again when it has finished (or remove {lock} if none is running).") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def write_registry(path: Path, registry: dict) -> None:
    """Replace a registry file whole (a crash leaves the old one, never half a file); the temporary file has
    a name of its own, so that two writers never share one."""
    handle, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}-", suffix=".tmp", dir=Path(path).parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(json.dumps(registry, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)

