"""--cpu_devices: fake N CPU devices, so sharding can be tried on a laptop. Must run before jax starts."""
import jax
from absl import flags

CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'Run on N fake CPU devices (jax_num_cpu_devices) instead of the default backend; 0: off.')


def apply() -> None:
  if CPU_DEVICES.value < 0:
    raise ValueError(f'--cpu_devices must be >= 0, got {CPU_DEVICES.value}')
  if CPU_DEVICES.value:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', CPU_DEVICES.value)
