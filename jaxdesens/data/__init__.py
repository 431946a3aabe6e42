"""Data: identity folders, the synthetic default, splits, grain pipelines, array_record sources."""

from __future__ import annotations

from pathlib import Path

from jaxdesens.data.errors import DataError
from jaxdesens.data.identity import IdentitySet, read_identity_folder, scan_identity_folder
from jaxdesens.data.splits import split_identities, split_per_identity
from jaxdesens.data.synthetic import SyntheticConfig, make_synthetic

__all__ = ["DataError", "IdentitySet", "SyntheticConfig", "load_dataset", "make_synthetic",
           "read_identity_folder", "scan_identity_folder", "split_identities", "split_per_identity"]


def load_dataset(path: str | Path | None, image_size: int, channels: int = 3,
                 synthetic: SyntheticConfig | None = None, progress: bool = False) -> IdentitySet:
    """Reads whatever `--data` points at: nothing (synthetic set), an identity folder, a
    desensitized export (with its mask) or a preprocessed array_record set."""
    if path is None:
        config = synthetic or SyntheticConfig()
        return make_synthetic(SyntheticConfig(config.identities, config.images_per_identity, image_size,
                                              channels, config.seed))
    path = Path(path)
    from jaxdesens.data import export_reader

    if export_reader.is_export(path):
        return export_reader.read_export(path, image_size, channels, progress=progress)
    from jaxdesens.data import arrayrecord

    if arrayrecord.is_identity_arrayrecord(path):
        dataset = arrayrecord.open_identity_arrayrecord(path).to_identity_set()
        if dataset.image_shape != (image_size, image_size, channels):
            raise DataError(f"{path}: array_record set holds {dataset.image_shape} images; "
                            f"run with --image_size={dataset.image_shape[0]} --channels={dataset.image_shape[2]}")
        return dataset
    return read_identity_folder(path, image_size, channels, progress=progress)
