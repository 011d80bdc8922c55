"""Reading and writing files safely: the one place every output of slsd goes through.

- `files`: one output file written atomically (temporary + rename), the one-line errors of a file
  system that refuses a write, leftovers of killed runs, json / json-lines readers.
- `file_sets`: outputs of several files committed together (`FileSet`, journal + roll-back), and
  `check_output` (an existing output needs `--force`).
- `tensors`: `torch.save` atomically, `torch.load(weights_only=True)`, safetensors.
- `locks`: one run at a time per output (`flock` on `.NAME.lock`, held for the command; `scope`,
  `acquire`).

Import from here (`from slsd_cli.io import atomic_write_json`): the names below are the API.
"""

from slsd_cli.io.files import (  # noqa: F401
    write_error,
    output_errors,
    make_dirs,
    new_dirs_removed_on_error,
    append_text,
    remove_temporaries,
    remove_leftovers,
    scratch_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_json,
    read_json,
    read_jsonl,
    gc_paused,
    remove_path,
)
from slsd_cli.io import locks  # noqa: F401
from slsd_cli.io.file_sets import (  # noqa: F401
    check_output,
    FileSet,
)
from slsd_cli.io.tensors import (  # noqa: F401
    json_metadata,
    torch_save_atomic,
    load_torch_file,
    save_safetensors_atomic,
    load_safetensors,
)
