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

from ..options import WriterError
from .common import ImageIndex, Request, class_list, is_image_name, labels_for, make_index, stem


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
    """Yield (class or None, member path, absolute data offset, size) for each image in the tar,
    descending one level into member tars. Only headers are read; data is skipped with seeks.
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
                            yield wnid, f"{member.name}/{item.name}", offset + item_offset, item_size
            elif is_image_name(member.name):
                parent = os.path.dirname(member.name.rstrip("/"))
                folder = os.path.basename(parent) or None
                yield folder, member.name, offset, size


def _data_members(tar: tarfile.TarFile, where, bar=None):
    """(member, data offset in `tar`, size) of each regular file and hard link of `tar`, a hard
    link with its target's data; WriterError for image members that are symbolic links."""
    names, symlinks = _RegularMembers(tar), []
    for member in tar:
        if bar is not None:
            bar.update(1)
        if member.islnk():
            target = names.get(member.linkname)
            if target is None:
                raise WriterError(f"{where}: {member.name} is a hard link to {member.linkname}, "
                                  "which is not a file earlier in the archive")
            yield member, target.offset_data, target.size
        elif member.issym() and is_image_name(member.name):
            symlinks.append(member.name)
        elif member.isfile():
            yield member, member.offset_data, member.size
    if symlinks:
        raise WriterError(f"{where}: {len(symlinks)} image members are symbolic links, which hold no "
                          f"data in a tar (first: {symlinks[0]}); archive the files they point to "
                          "(tar --dereference)")


class _RegularMembers:
    """The regular members of a tar by name, for the hard links to name. tarfile keeps every member
    it has read; the index over them is built only when a link appears (an archive without
    links costs nothing more) and extended with what was read since."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar, self.by_name, self.indexed = tar, {}, 0

    def get(self, name: str):
        members = self.tar.members
        for member in members[self.indexed:]:
            if member.isfile():
                self.by_name[member.name] = member
        self.indexed = len(members)
        return self.by_name.get(name)


def index_tar(tar_path: Path, val_labels, classes_file, progress: bool) -> ImageIndex:
    entries = list(scan_tar(tar_path, progress))
    if not entries:
        raise WriterError(f"{tar_path}: no images (*.JPEG/*.jpg/*.png or per-class .tar) inside")
    names = [e[1] for e in entries]
    offsets = [e[2] for e in entries]
    sizes = [e[3] for e in entries]
    nested = any("/" in n and n.split("/", 1)[0].lower().endswith(".tar") for n in names)
    source = {"kind": "class_tars" if nested else "image_tar", "path": str(tar_path)}
    if val_labels and not nested:
        stems = [stem(n) for n in names]
        labels, wnids = labels_for(stems, val_labels, classes_file, str(tar_path))
        source["val_labels"] = str(val_labels)
        return make_index(tar_path, names, offsets, sizes, list(labels), wnids, source)
    if val_labels:
        raise WriterError(f"cfg.val_labels={val_labels} given, but {tar_path} is a tar of "
                          "per-class tars whose names are the labels; drop cfg.val_labels")
    classes = [e[0] for e in entries]
    if any(c is None for c in classes):
        raise WriterError(f"{tar_path} holds images with no class folder or class tar: a flat "
                          "(val) archive needs cfg.val_labels")
    wnids = class_list(set(classes), classes_file, f"classes of {tar_path}")
    position = {w: i for i, w in enumerate(wnids)}
    labels = [position[c] for c in classes]
    return make_index(tar_path, names, offsets, sizes, labels, wnids, source)
