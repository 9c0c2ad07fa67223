"""Layout: an uncompressed tar read in place, never unpacked. Either a tar of per-class tars
(`ILSVRC2012_img_train.tar`: the class is the inner tar's name) or a tar of images
(`ILSVRC2012_img_val.tar`: labelled by val_labels, or by the folder above each image inside the
tar). `data_dir` may be the tar itself (`index_archive`) or a folder holding
`ILSVRC2012_img_<split>.tar` or a single `*.tar` and no images (`index_folder_of_tars`, tried
last). Only member headers are read here; workers read each image with `pread`. A hard-link member
(a second name of one file) is a sample read from the data of the member it names; symbolic-link
members are refused with their count, never skipped in silence."""

import os
import tarfile
from pathlib import Path

import numpy as np

from ..options import WriterError
from .common import Columns, ImageIndex, Request, class_list, is_image_name, labels_for, make_index, stem


def index_archive(request: Request) -> "ImageIndex | None":
    path = request.path
    if not path.is_file():
        return None
    if not tarfile.is_tarfile(path):
        raise WriterError(f"cfg.data_dir={path}: a file, but not a tar archive")
    return index_tar(path, request.val_labels, request.classes, request.progress)


def index_folder_of_tars(request: Request) -> "ImageIndex | None":
    tars = [name for name in request.listing.files if name.lower().endswith(".tar")]
    if not tars:
        return None
    wanted = f"ILSVRC2012_img_{request.split}.tar"
    if wanted not in tars and len(tars) > 1:
        raise WriterError(f"{request.path} holds several tars ({', '.join(tars)}) and no {wanted}; "
                          "pass the tar itself as cfg.data_dir")
    chosen = wanted if wanted in tars else tars[0]
    return index_tar(request.path / chosen, request.val_labels, request.classes, request.progress)


def scan_tar(tar_path: Path, progress: bool):
    """Yield (class or None, member path, absolute data offset, size, inside a member tar) for each
    image in the tar, descending one level into member tars. Only headers are read; data is skipped with seeks.
    A hard-link member is a sample of its own, read from the data of the member it names;
    symbolic links are refused (a tar holds no data for them), never skipped in silence."""
    from ...progress import progress as progress_bar

    try:
        outer = tarfile.open(tar_path, mode="r:")
    except tarfile.ReadError as e:
        raise WriterError(f"{tar_path}: not an uncompressed tar ({e}); compressed archives cannot "
                          "be read in place, decompress them first") from None
    with outer, progress_bar(desc=f"indexing {tar_path.name}", unit=" members", enabled=progress) as bar:
        for member, offset, size in _data_members(outer, tar_path, bar):
            if member.name.lower().endswith(".tar"):
                wnid = stem(member.name)
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    for item, item_offset, item_size in _data_members(inner, f"{tar_path}:{member.name}"):
                        if is_image_name(item.name):
                            yield wnid, f"{member.name}/{item.name}", offset + item_offset, item_size, True
            elif is_image_name(member.name):
                parent = os.path.dirname(member.name.rstrip("/"))
                folder = os.path.basename(parent) or None
                yield folder, member.name, offset, size, False


def _data_members(tar: tarfile.TarFile, where, bar=None):
    """(member, data offset in `tar`, size) of each regular file and hard link of `tar`, a hard
    link with its target's data; WriterError for image members that are symbolic links.

    tarfile keeps every member it has read (~1 KB a TarInfo: a 1.28 M-member archive would hold
    gigabytes); this drops them as it goes and keeps only name -> (offset, size) of regular
    members, for hard links to name."""
    files, symlinks = {}, []
    while (member := tar.next()) is not None:
        tar.members.clear()
        if bar is not None:
            bar.update(1)
        if member.islnk():
            target = files.get(member.linkname)
            if target is None:
                raise WriterError(f"{where}: {member.name} is a hard link to {member.linkname}, "
                                  "which is not a file earlier in the archive")
            # a member of its own with the target's data: extractfile() can read it although
            # tarfile no longer holds the target's TarInfo (dropped above)
            copy = tarfile.TarInfo(member.name)
            copy.type, copy.offset_data, copy.size = tarfile.REGTYPE, *target
            yield copy, *target
        elif member.issym() and is_image_name(member.name):
            symlinks.append(member.name)
        elif member.isfile():
            files[member.name] = (member.offset_data, member.size)
            yield member, member.offset_data, member.size
    if symlinks:
        raise WriterError(f"{where}: {len(symlinks)} image members are symbolic links, which hold no "
                          f"data in a tar (first: {symlinks[0]}); archive the files they point to "
                          "(tar --dereference)")


def index_tar(tar_path: Path, val_labels, classes_file, progress: bool) -> ImageIndex:
    rows, class_numbers, nested = Columns(), {}, False
    for folder, name, offset, size, in_member_tar in scan_tar(tar_path, progress):
        rows.append(name, offset, size, class_numbers.setdefault(folder, len(class_numbers)))
        nested = nested or in_member_tar
    if not len(rows):
        raise WriterError(f"{tar_path}: no images (*.JPEG/*.jpg/*.png or per-class .tar) inside")
    names, offsets, sizes, numbers = rows.arrays()
    source = {"kind": "class_tars" if nested else "image_tar", "path": str(tar_path)}
    if val_labels and not nested:
        stems = [stem(os.fsdecode(n)) for n in names]
        labels, wnids = labels_for(stems, val_labels, classes_file, str(tar_path))
        source["val_labels"] = str(val_labels)
        return make_index(tar_path, names, offsets, sizes, labels, wnids, source)
    if val_labels:
        raise WriterError(f"cfg.val_labels={val_labels} given, but {tar_path} is a tar of "
                          "per-class tars whose names are the labels; drop cfg.val_labels")
    if None in class_numbers:
        raise WriterError(f"{tar_path} holds images with no class folder or class tar: a flat "
                          "(val) archive needs cfg.val_labels")
    wnids = class_list(set(class_numbers), classes_file, f"classes of {tar_path}")
    position = {w: i for i, w in enumerate(wnids)}
    label_of_number = np.zeros(len(class_numbers), dtype=np.int64)
    for folder, number in class_numbers.items():
        label_of_number[number] = position[folder]
    return make_index(tar_path, names, offsets, sizes, label_of_number[numbers], wnids, source)
