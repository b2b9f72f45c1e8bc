"""Models that are not csn's: any importable factory ('package.module:factory') and timm models ('timm:NAME').

Their read points come from the run's `layers` patterns, from a `csn_stages` attribute the model sets
itself, or (torchvision/timm ResNets) from their layer1..layerN children (csn.core.units.stages).
Before a model is used, one forward pass of two blank images checks that it takes the dataset's images
and returns one logit per class, so a mismatch is one sentence at start-up rather than a shape error
deep inside training.

Code named by data (the trust rule): 'package.module:factory' is Python code that csn imports and runs.
Named in a file csn reads (a config or study file, a run's run.json), it runs only when the command line
says so (`--trust-code`, never settable from a file; in Python `with trusting_code(): ...`), as with
Hugging Face's trust_remote_code; typed on the command line itself (`--model pkg.mod:f`, `model=pkg.mod:f`)
it is explicit and needs no flag. `timm:NAME` and csn's own models are not code named by data. The factory
must be a Python function (or an nn.Module class), never a builtin such as `builtins:input` or `sys:exit`;
while its module is imported and it runs, stdin reads from /dev/null, `breakpoint()` is an error, and
SystemExit, KeyboardInterrupt or a debugger's quit become one CsnError.
"""

from __future__ import annotations

import bdb
import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from csn.errors import CsnError

_TRUSTED = [False]
"""Whether code named by data may run in this process now (set by --trust-code for one command)."""


def names_code(spec: object) -> bool:
    """True for a model given as 'package.module:factory' (code csn would import and run); 'timm:NAME' and csn's
    own model names are not code."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith("timm:")


def code_trusted() -> bool:
    """Whether code named by data may run now (--trust-code, or inside `trusting_code()`)."""
    return _TRUSTED[0]


def set_trust_code(enabled: bool) -> Callable[[], None]:
    """Set whether code named by data may run (a command's --trust-code); returns the function restoring the
    previous setting. Prefer `trusting_code()` where a `with` block fits."""
    before = _TRUSTED[0]
    _TRUSTED[0] = bool(enabled)

    def restore() -> None:
        _TRUSTED[0] = before

    return restore


@contextlib.contextmanager
def trusting_code(enabled: bool = True) -> Iterator[None]:
    """Let code named by data (a run's or a file's 'package.module:factory') run inside this block."""
    restore = set_trust_code(enabled)
    try:
        yield
    finally:
        restore()


def require_trust(spec: object, trust_code: bool | None, where: str) -> None:
    """Refuse a model that is code named by data (`where`: the file that names it, e.g. 'runs/a/run.json' or
    'config file study.toml') unless trusted: trust_code True, or None and the process trusts code now
    (code_trusted()). csn's own models and 'timm:NAME' always pass."""
    trusted = code_trusted() if trust_code is None else trust_code
    if names_code(spec) and not trusted:
        raise CsnError(f"{where} names the model {spec!r}, Python code csn would import and run; if you trust it, pass "
                       "--trust-code on the command line (a file can never grant it; in Python: `with "
                       "csn.models.trusting_code(): ...`).")


def _no_breakpoint(spec: str, *args: Any, **kwargs: Any) -> None:
    raise CsnError(f"model {spec!r} called breakpoint() while it was imported or built; csn builds models without a "
                   "debugger: remove the call (or debug the factory in Python).")


@contextlib.contextmanager
def _foreign_code(spec: str) -> Iterator[None]:
    """While a factory's module is imported and the factory runs: stdin reads from /dev/null (no prompt can wait
    on it), breakpoint() is an error, and SystemExit, KeyboardInterrupt or a debugger's quit become one CsnError."""
    saved_stdin, saved_hook = sys.stdin, sys.breakpointhook
    devnull = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - closed in finally
    try:
        saved_fd: int | None = os.dup(0)
    except OSError:
        saved_fd = None  # stdin was closed: it is /dev/null below, and closed again after
    os.dup2(devnull.fileno(), 0)
    sys.stdin = devnull
    sys.breakpointhook = lambda *a, **k: _no_breakpoint(spec, *a, **k)
    try:
        yield
    except (SystemExit, KeyboardInterrupt, bdb.BdbQuit) as e:
        what = (f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else
                "raised KeyboardInterrupt" if isinstance(e, KeyboardInterrupt) else "entered the debugger and quit it")
        raise CsnError(f"model {spec!r} {what} while it was imported or built; a factory must return the model, not "
                       "stop csn: fix the factory.") from None
    finally:
        sys.stdin, sys.breakpointhook = saved_stdin, saved_hook
        if saved_fd is not None:
            os.dup2(saved_fd, 0)
            os.close(saved_fd)
        else:
            with contextlib.suppress(OSError):
                os.close(0)
        devnull.close()


def _load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by 'package.module:attr' (attr may be dotted: 'mod:Class.build')."""
    module_name, _, attr = spec.partition(":")
    fix = "write the model as 'package.module:factory' with the module importable (on PYTHONPATH or installed)"
    if not module_name or not attr or any(not p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise CsnError(f"model {spec!r} is neither a csn model name nor 'package.module:factory'; {fix}.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CsnError(f"model {spec!r}: module {module_name!r} cannot be imported ({e}); {fix}.") from None
    except CsnError:
        raise
    except Exception as e:  # noqa: BLE001 - the module's own code failed while it was imported
        raise CsnError(f"model {spec!r}: importing module {module_name!r} failed ({type(e).__name__}: "
                       f"{_first_line(e)}); fix the module.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CsnError(f"model {spec!r}: {module_name} has no attribute {attr!r}; {fix}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CsnError(f"model {spec!r}: {module_name}.{attr} is not callable; name a function or class that returns "
                       "an nn.Module.")
    kind = _not_a_python_factory(obj)
    if kind:
        raise CsnError(f"model {spec!r}: {module_name}.{attr} is {kind}, not a Python function or nn.Module class; name "
                       "a function defined in Python (or an nn.Module subclass) that returns the model.")
    return obj


def _not_a_python_factory(obj: Any) -> str | None:
    """Why `obj` cannot be a factory (a builtin, a class that is no nn.Module, a callable object), or None for a
    function or method defined in Python or an nn.Module subclass."""
    if inspect.isclass(obj):
        return None if issubclass(obj, nn.Module) else f"the class {obj.__qualname__}, which is no nn.Module"
    fn = obj.__func__ if inspect.ismethod(obj) else obj
    if inspect.isfunction(fn):
        return None
    if inspect.isbuiltin(fn) or inspect.ismethoddescriptor(fn):
        return "a built-in function"
    return f"a {type(obj).__name__} object"


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""


def factory_model(spec: str, *, num_classes: int, in_channels: int, width: float,
                  image_size: int | tuple[int, int] | list[int] | None, **extra: Any) -> nn.Module:
    """Build 'package.module:factory' (its factory called with the arguments its signature names) and check its
    output (check_output), with stdin closed and stops of the factory turned into one CsnError (_foreign_code)."""
    with _foreign_code(spec):
        model = _call_factory(spec, num_classes=num_classes, in_channels=in_channels, width=width,
                              image_size=image_size, **extra)
        return check_output(model, spec, num_classes, in_channels, image_size)


def _call_factory(spec: str, *, num_classes: int, in_channels: int, width: float,
                  image_size: int | tuple[int, int] | list[int] | None, **extra: Any) -> nn.Module:
    """Call the factory of 'package.module:factory' with the arguments its signature names."""
    fn = _load_factory(spec)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "width": width, "image_size": image_size, **extra}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass nothing it might refuse
        params = {}
    kwargs = {k: v for k, v in offered.items() if k in params and v is not None}
    if width != 1.0 and "width" not in params:
        raise CsnError(f"model {spec!r} takes no width argument, so width={width:g} cannot apply; use width=1 or add "
                       "a width parameter to the factory.")
    try:
        model = fn(**kwargs)
    except (CsnError, bdb.BdbQuit):
        raise
    except Exception as e:
        raise CsnError(f"model {spec!r} failed to build with {kwargs} ({type(e).__name__}: {e}); fix the factory or "
                       "its arguments.") from None
    if not isinstance(model, nn.Module):
        raise CsnError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module; return the model.")
    return model


def timm_model(name: str, num_classes: int, in_channels: int, width: float,
               image_size: int | tuple[int, int] | list[int] | None) -> nn.Module:
    """timm.create_model(name) untrained, for the dataset's classes, channels and (where it takes one) image size."""
    try:
        import timm
    except ImportError:
        raise CsnError(f"model 'timm:{name}' needs timm, which is not installed; install it with "
                       "`pip install 'csn[timm]'` (or use a csn model such as resnet20 or vit-tiny).") from None
    if width != 1.0:
        raise CsnError(f"width={width:g} applies to csn's own models only; timm:{name} is built as timm defines it "
                       "(use width=1).")
    if not name or name not in timm.list_models():
        raise CsnError(f"timm has no model {name!r}; `python -c \"import timm; print(timm.list_models('*vit*'))\"` "
                       "lists its names.")
    kw: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    if image_size is not None:  # ViT-like timm models are built for an image size; others refuse the argument
        try:
            return timm.create_model(name, img_size=image_size if isinstance(image_size, int) else tuple(image_size), **kw)
        except TypeError:
            pass
    return timm.create_model(name, **kw)


def check_output(model: nn.Module, name: str, num_classes: int, in_channels: int,
                 image_size: int | tuple[int, int] | list[int] | None) -> nn.Module:
    """One eval-mode forward of two blank images: the model must return [2, num_classes] logits."""
    if image_size is None or any(t.is_meta for t in model.parameters()):
        return model  # a skeleton on the meta device (the size check before training): checked when really built
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    x = torch.zeros(2, in_channels, h, w)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (CsnError, bdb.BdbQuit):
        raise
    except Exception as e:
        raise CsnError(f"model {name!r} fails on a batch of {in_channels}-channel {h}x{w} images ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); build it for the dataset's images.") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CsnError(f"model {name!r} returns {got} for 2 images, not logits of shape (2, {num_classes}); it must "
                       f"output one logit per class ({num_classes} classes).")
    return model


__all__ = ["factory_model", "timm_model", "check_output", "names_code", "code_trusted", "set_trust_code",
           "trusting_code", "require_trust"]
