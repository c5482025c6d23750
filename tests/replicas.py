"""Writers of small replicas of the fine-grained datasets in their exact on-disk formats.

``placeholder=True`` writes empty image files: enough for list/split tests at full size,
where nothing is decoded.
"""
import os

import numpy as np
from PIL import Image


def _image(path, size, seed, placeholder):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if placeholder:
        open(path, "wb").close()
        return
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def write_cub(root, n_classes=4, per_class=4, placeholder=False, trailing_newline=False, nested=False):
    """CUB_200_2011/ with alternate train/test images; returns the dataset folder."""
    base = os.path.join(root, "CUB_200_2011", "CUB_200_2011" if nested else "")
    os.makedirs(base, exist_ok=True)
    classes, images, labels, split, boxes = [], [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        folder = f"{c:03d}.Bird_kind_{c}"
        classes.append(f"{c} {folder}")
        for i in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_Kind_{c}_{i:04d}_{image_id}.jpg"  # case differs from the folder, as in CUB
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if i % 2 == 0 else 0}")
            boxes.append(f"{image_id} {4.0 + c} {3.0} {20.0} {12.0 + i}")
            _image(os.path.join(base, "images", rel), (40 + i, 30), image_id, placeholder)
    end = "\n" if trailing_newline else ""
    for name, lines in [("classes.txt", classes), ("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes)]:
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + end)
    return base


AIRCRAFT_VARIANTS = ["707-320", "A300B4", "F/A-18", "Falcon 2000", "Cessna 172", "BAE 146-200"]


def write_aircraft(root, variants=AIRCRAFT_VARIANTS, n_images=None, placeholder=False, size=(60, 50),
                   split_sizes=None):
    """fgvc-aircraft-2013b/data with train/val/test = ids 0,1,2 mod 3 unless split_sizes is given."""
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    n_images = n_images or 4 * len(variants)
    families = [f"Family {v.split('-')[0]}" for v in variants]
    manufacturers = [f"Maker/{k % 3}" for k in range(len(variants))]
    fam_order = list(dict.fromkeys(families))
    man_order = list(dict.fromkeys(manufacturers))
    with open(os.path.join(data, "variants.txt"), "w") as f:
        f.write("\n".join(variants) + "\n")
    with open(os.path.join(data, "families.txt"), "w") as f:
        f.write("\n".join(fam_order) + "\n")
    with open(os.path.join(data, "manufacturers.txt"), "w") as f:
        f.write("\n".join(man_order) + "\n")
    ids = [f"{k * 7 + 56:07d}" for k in range(n_images)]  # leading zeros matter
    if split_sizes:
        a, b = split_sizes[0], split_sizes[0] + split_sizes[1]
        split_of = ["train" if k < a else "val" if k < b else "test" for k in range(n_images)]
    else:
        split_of = [("train", "val", "test")[k % 3] for k in range(n_images)]
    rows = {(lvl, s): [] for lvl in ("variant", "family", "manufacturer") for s in ("train", "val", "test")}
    boxes = []
    for k, image_id in enumerate(ids):
        v = k % len(variants)
        for lvl, name in (("variant", variants[v]), ("family", families[v]), ("manufacturer", manufacturers[v])):
            rows[(lvl, split_of[k])].append(f"{image_id} {name}")
        boxes.append(f"{image_id} {3 + k % 5} {2} {size[0] - 4} {size[1] - 25}")
        _image(os.path.join(data, "images", f"{image_id}.jpg"), size, k, placeholder)
    for lvl in ("variant", "family", "manufacturer"):
        for s in ("train", "val", "test"):
            with open(os.path.join(data, f"images_{lvl}_{s}.txt"), "w") as f:
                f.write("\n".join(rows[(lvl, s)]) + "\n")
        with open(os.path.join(data, f"images_{lvl}_trainval.txt"), "w") as f:
            f.write("\n".join(rows[(lvl, "train")] + rows[(lvl, "val")]) + "\n")
    with open(os.path.join(data, "images_box.txt"), "w") as f:
        f.write("\n".join(boxes) + "\n")
    return data


CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012",
               "Audi TTS Coupe 2012", "BMW X6 SUV 2012"]


def _car_annotations(n, n_classes, offset):
    """(fname, x1, y1, x2, y2, class) with 1-based classes; classes are not sorted by name on purpose."""
    return [(f"{k + 1:05d}.jpg", 2 + k % 3, 3, 30 + k % 4, 20, 1 + (k * 3 + offset) % n_classes) for k in range(n)]


def _save_annos(path, annotations, with_class=True):
    from scipy.io import savemat

    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    arr = np.zeros((1, len(annotations)), dtype=[(f, "O") for f in fields])
    for k, (fname, x1, y1, x2, y2, cls) in enumerate(annotations):
        values = {"bbox_x1": np.uint8(x1), "bbox_y1": np.uint8(y1), "bbox_x2": np.uint16(x2),
                  "bbox_y2": np.uint16(y2), "class": np.uint8(cls), "fname": fname}
        for f in fields:
            arr[0, k][f] = values[f]
    savemat(path, {"annotations": arr})


def write_cars(root, layout="original", classes=CAR_CLASSES, n_train=10, n_test=8, placeholder=False,
               csv_above=False):
    """Stanford Cars in one of the three layouts; returns (folder, train annotations, test annotations).

    kaggle_folders is the unpacked Kaggle archive: ``car_data/`` with names.csv, anno_*.csv and
    ``car_data/{train,test}``; ``csv_above`` puts the CSVs one level higher instead (another copy's form).
    """
    from scipy.io import savemat

    train, test = _car_annotations(n_train, len(classes), 0), _car_annotations(n_test, len(classes), 1)
    if layout == "kaggle_folders":
        base = os.path.join(root, "car_data")
        csv_dir = root if csv_above else base
        for split, annos in (("train", train), ("test", test)):
            for fname, *_, cls in annos:
                folder = classes[cls - 1].replace("/", "-")
                _image(os.path.join(base, "car_data", split, folder, fname), (40, 30),
                       hash((split, fname)) % 1000, placeholder)
            with open(os.path.join(csv_dir, f"anno_{split}.csv"), "w") as f:
                f.write("\n".join(",".join(map(str, a)) for a in annos) + "\n")
        with open(os.path.join(csv_dir, "names.csv"), "w") as f:
            f.write("\n".join(classes) + "\n")
        return base, train, test
    base = os.path.join(root, "stanford_cars")
    nested = layout == "kaggle_nested"
    devkit = os.path.join(base, "car_devkit", "devkit") if nested else os.path.join(base, "devkit")
    os.makedirs(devkit, exist_ok=True)
    meta = np.empty((1, len(classes)), dtype=object)
    for k, name in enumerate(classes):
        meta[0, k] = name
    savemat(os.path.join(devkit, "cars_meta.mat"), {"class_names": meta})
    _save_annos(os.path.join(devkit, "cars_train_annos.mat"), train)
    _save_annos(os.path.join(devkit, "cars_test_annos.mat"), test, with_class=False)
    label_file = "cars_test_annos_withlabels (1).mat" if nested else "cars_test_annos_withlabels.mat"
    _save_annos(os.path.join(base, label_file), test)
    for split, annos in (("cars_train", train), ("cars_test", test)):
        for fname, *_ in annos:
            folder = os.path.join(base, split, split) if nested else os.path.join(base, split)
            _image(os.path.join(folder, fname), (40, 30), hash((split, fname)) % 1000, placeholder)
    return base, train, test
