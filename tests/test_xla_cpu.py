"""ddpm_jax/xla_cpu.py: importing ddpm_jax hands XLA:CPU's convolutions to Eigen, and a user's own
XLA_FLAGS win."""

import os
import subprocess
import sys

from ddpm_jax import xla_cpu

# Compiles one convolution and prints whether XLA gave it to YNNPACK (a `__ynn` fusion).
_PROBE = """
import ddpm_jax, jax, jax.numpy as jnp
x, w = jnp.ones((1, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
print('__ynn' in jax.jit(conv).lower(x, w).compile().as_text())
"""


def _convolution_on_ynnpack(env: dict[str, str]) -> bool:
  out = subprocess.run(
    [sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, check=True
  )
  return out.stdout.split()[-1] == 'True'


def test_flags_are_appended_and_a_users_own_setting_wins():
  assert xla_cpu.with_convolutions_on_eigen('') == xla_cpu.CONVOLUTIONS_ON_EIGEN
  assert xla_cpu.with_convolutions_on_eigen('--xla_foo=1') == (
    f'--xla_foo=1 {xla_cpu.CONVOLUTIONS_ON_EIGEN}'
  )
  own = '--xla_foo=1 --xla_cpu_experimental_ynn_fusion_type=dot'
  assert xla_cpu.with_convolutions_on_eigen(own) == own


def test_an_older_jaxlib_or_the_opt_out_leaves_xla_flags_alone(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1')
  monkeypatch.delenv('DDPM_JAX_KEEP_XLA_FLAGS', raising=False)
  xla_cpu.configure()
  assert os.environ['XLA_FLAGS'] == f'--xla_foo=1 {xla_cpu.CONVOLUTIONS_ON_EIGEN}'

  for older, opt_out in (((0, 9), None), ((), None), ((0, 10), '1')):
    monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1')
    monkeypatch.setattr(xla_cpu, '_jaxlib_version', lambda older=older: older)
    if opt_out:
      monkeypatch.setenv('DDPM_JAX_KEEP_XLA_FLAGS', opt_out)
    xla_cpu.configure()
    assert os.environ['XLA_FLAGS'] == '--xla_foo=1'


def test_importing_ddpm_jax_takes_convolutions_off_ynnpack():
  """jaxlib's own default (0.10 to 0.12) gives convolutions to YNNPACK (seen with
  DDPM_JAX_KEEP_XLA_FLAGS); after `import ddpm_jax` they go to Eigen."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'DDPM_JAX_KEEP_XLA_FLAGS')}
  assert not _convolution_on_ynnpack(env)
  assert _convolution_on_ynnpack({**env, 'DDPM_JAX_KEEP_XLA_FLAGS': '1'})
