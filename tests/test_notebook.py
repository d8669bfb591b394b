"""The demo notebook: stored without outputs, and run top to bottom in its reduced mode.

`DDPM_JAX_NOTEBOOK_QUICK=1` shrinks its sizes (training steps, images), never its code paths;
`HF_HUB_OFFLINE=1` makes its Hub cell skip, as it does without network access.
"""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / 'notebooks' / 'ddpm_jax_demo.ipynb'


def test_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert code_cells
  for index, cell in enumerate(code_cells):
    assert cell.outputs == [] and cell.execution_count is None, (
      f'Code cell {index} has outputs: clear them before committing '
      '(jupyter nbconvert --clear-output --inplace notebooks/ddpm_jax_demo.ipynb).'
    )


def test_notebook_runs_in_its_reduced_mode(tmp_path, monkeypatch):
  monkeypatch.setenv('DDPM_JAX_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('DDPM_JAX_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': str(NOTEBOOK.parent)}},
  )
  client.execute()  # Raises CellExecutionError, with the cell and its traceback, on any error.

  def text(cell):
    return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')

  outputs = [text(cell) for cell in notebook.cells if cell.cell_type == 'code']
  assert 'Devices:' in outputs[0]
  assert 'Trained 40 steps' in ''.join(outputs)
  assert 'frechet_distance' in ''.join(outputs)
  assert 'Skipped the official model' in ''.join(outputs)  # Offline: the Hub cell skips.
  images = sum(
    1
    for cell in notebook.cells
    for o in cell.get('outputs', [])
    if 'image/png' in o.get('data', {})
  )
  assert images >= 9  # Process, schedules, loss, 4 sample figures, sampler comparison, bpd.
