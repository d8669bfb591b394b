"""Makes `import torchvision` work next to the CPU build of torch, for tests and benchmarks.

The one home of this workaround: `tests/conftest.py` and `benchmarks/torch_reference.py` both
call `import_torchvision_without_its_cpp_ops()` before anything imports diffusers or
pytorch-fid (diffusers' `UNet2DModel` imports torchvision, and fails without it).
"""

import sys
import types


def import_torchvision_without_its_cpp_ops():
  """PyPI's torchvision wheels are CUDA builds; next to the CPU torch their C++ operators (nms,
  roi_align, ...) cannot load and `import torchvision` fails registering fake kernels for them.
  Replace the two modules that register them by empty ones, so that torchvision's pure-Python
  parts (models, transforms) import, for pytorch-fid and for diffusers. Does nothing when
  torchvision imports cleanly or is not installed."""
  try:
    import torchvision  # noqa: F401
  except ImportError:
    return
  except RuntimeError:
    for name in [name for name in sys.modules if name.split('.')[0] == 'torchvision']:
      del sys.modules[name]
    for name in ('torchvision._meta_registrations', 'torchvision._autograd_registrations'):
      sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401
