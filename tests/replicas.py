"""Writers of small replicas of the fine-grained datasets in their exact on-disk formats.

``placeholder=True`` writes empty image files: enough for list/split tests at full size,
where nothing is decoded.
"""
import os
import zlib

import numpy as np
from PIL import Image


def _seed(*parts):
    """A pixel seed that is the same in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


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


def _write_cars_combined(base, train, test, classes, placeholder):
    """car_ims/ + cars_annos.mat: one numbering over both splits, ordered by class as in the original file, so
    train and test images interleave and only the ``test`` flag separates them. Returns the annotations of each
    split renamed to their car_ims/ names, in file order."""
    from scipy.io import savemat

    rows = sorted([(cls, 0, a) for a in train for cls in [a[5]]] + [(cls, 1, a) for a in test for cls in [a[5]]],
                  key=lambda r: r[0])
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    renamed = ([], [])
    for k, (cls, is_test, (_, x1, y1, x2, y2, _)) in enumerate(rows):
        name = f"{k + 1:06d}.jpg"
        values = {"relative_im_path": f"car_ims/{name}", "bbox_x1": np.uint16(x1), "bbox_y1": np.uint16(y1),
                  "bbox_x2": np.uint16(x2), "bbox_y2": np.uint16(y2), "class": np.uint8(cls), "test": np.uint8(is_test)}
        for f in fields:
            arr[0, k][f] = values[f]
        renamed[is_test].append((name, x1, y1, x2, y2, cls))
        _image(os.path.join(base, "car_ims", name), (40, 30), k, placeholder)
    names = np.empty((1, len(classes)), dtype=object)
    for k, class_name in enumerate(classes):
        names[0, k] = class_name
    savemat(os.path.join(base, "cars_annos.mat"), {"annotations": arr, "class_names": names})
    return base, renamed[0], renamed[1]


def write_cars(root, layout="original", classes=CAR_CLASSES, n_train=10, n_test=8, placeholder=False,
               csv_above=False):
    """Stanford Cars in one of the four layouts; returns (folder, train annotations, test annotations).

    kaggle_folders is the unpacked Kaggle archive: ``car_data/`` with names.csv, anno_*.csv and
    ``car_data/{train,test}``; ``csv_above`` puts the CSVs one level higher instead (another copy's form).
    combined is ``car_ims.tgz`` unpacked beside ``cars_annos.mat`` in a folder of the user's choosing.
    """
    from scipy.io import savemat

    train, test = _car_annotations(n_train, len(classes), 0), _car_annotations(n_test, len(classes), 1)
    if layout == "combined":
        return _write_cars_combined(os.path.join(root, "stanford_cars"), train, test, classes, placeholder)
    if layout == "kaggle_folders":
        base = os.path.join(root, "car_data")
        csv_dir = root if csv_above else base
        for split, annos in (("train", train), ("test", test)):
            for fname, *_, cls in annos:
                folder = classes[cls - 1].replace("/", "-")
                _image(os.path.join(base, "car_data", split, folder, fname), (40, 30),
                       _seed(split, fname), placeholder)
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
            _image(os.path.join(folder, fname), (40, 30), _seed(split, fname), placeholder)
    return base, train, test


# ---- the further fine-grained sets, in their official layouts --------------------------------------------------
NABIRDS_LEAVES = [817, 37, 1000, 295]  # not contiguous, not sorted: labels follow ascending ids


def write_nabirds(root, per_class=4, placeholder=False):
    """nabirds/ with dashed UUID image ids, hex file names under 4-digit class folders, a taxonomy in classes.txt
    (inner nodes without images), integer boxes; returns the dataset folder."""
    base = os.path.join(root, "nabirds")
    os.makedirs(base, exist_ok=True)
    classes = ["0 Birds", "1 Owls", "2 Perching birds"] + [f"{c} Bird species {c}" for c in NABIRDS_LEAVES]
    images, labels, split, boxes = [], [], [], []
    n = 0
    for c in NABIRDS_LEAVES:
        for i in range(per_class):
            n += 1
            hex_id = f"{n:08x}{c:04x}{'ab' * 10}"[:32]
            image_id = f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"
            rel = f"{c:04d}/{hex_id}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if i % 2 == 0 else 0}")
            boxes.append(f"{image_id} {2 + i} 3 20 {12 + i}")
            _image(os.path.join(base, "images", rel), (40 + i, 30), n, placeholder)
    for name, lines in [("classes.txt", classes), ("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes),
                        ("hierarchy.txt", ["1 0", "2 0"] + [f"{c} {1 + k % 2}" for k, c in enumerate(NABIRDS_LEAVES)])]:
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return base


DOG_BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu"]


def _mat_list(entries):
    """A MATLAB cell column as scipy writes it for the Stanford Dogs lists: (N, 1) object array of 1-element arrays."""
    cells = np.empty((len(entries), 1), dtype=object)
    for k, entry in enumerate(entries):
        cells[k, 0] = np.array([entry])
    return cells


def write_dogs(root, breeds=DOG_BREEDS, per_class=4, placeholder=False, two_dogs=True):
    """Images/, Annotation/ (VOC XML without extension; the first image of each breed has two dogs) and
    {file,train,test}_list.mat at the top level, as the three tars unpack; returns that folder."""
    import scipy.io

    base = os.path.join(root, "stanford_dogs")
    lists = {"train": [], "test": []}
    for label, breed in enumerate(breeds, start=1):
        wnid = breed.split("-")[0]
        for i in range(per_class):
            name = f"{breed}/{wnid}_{100 + i}"
            _image(os.path.join(base, "Images", name + ".jpg"), (50, 40), 7 * label + i, placeholder)
            objects = [(3, 4, 20 + i, 30)] + ([(25, 2, 45, 20)] if two_dogs and i == 0 else [])
            xml = "".join(f"<object><name>{breed.split('-', 1)[1]}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                          f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>" for a, b, c, d in objects)
            os.makedirs(os.path.join(base, "Annotation", breed), exist_ok=True)
            with open(os.path.join(base, "Annotation", name), "w") as f:
                f.write(f"<annotation><folder>{wnid[1:]}</folder><filename>{wnid}_{100 + i}</filename>"
                        f"<size><width>50</width><height>40</height><depth>3</depth></size>{xml}</annotation>")
            lists["train" if i % 2 == 0 else "test"].append((name, label))
    for split, rows in list(lists.items()) + [("file", lists["train"] + lists["test"])]:
        scipy.io.savemat(os.path.join(base, f"{split}_list.mat"), {
            "file_list": _mat_list([n + ".jpg" for n, _ in rows]), "annotation_list": _mat_list([n for n, _ in rows]),
            "labels": np.array([[label] for _, label in rows], dtype=np.uint8)})
    return base


def write_flowers(root, n_images=24, n_classes=102, placeholder=False):
    """flowers-102/{jpg/, imagelabels.mat, setid.mat} as torchvision expects; labels 1..n_classes; returns it."""
    import scipy.io

    base = os.path.join(root, "flowers-102")
    labels = np.array([[1 + (k * 7) % n_classes for k in range(n_images)]], dtype=np.uint8)
    for k in range(n_images):
        _image(os.path.join(base, "jpg", f"image_{k + 1:05d}.jpg"), (40, 36), k, placeholder)
    ids = np.arange(1, n_images + 1)
    scipy.io.savemat(os.path.join(base, "imagelabels.mat"), {"labels": labels})
    scipy.io.savemat(os.path.join(base, "setid.mat"), {"trnid": ids[ids % 3 == 1][None], "valid": ids[ids % 3 == 2][None],
                                                       "tstid": ids[ids % 3 == 0][None]})
    return base


PET_BREEDS = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1), ("yorkshire_terrier", 2)]


def write_pets(root, per_class=4, placeholder=False):
    """oxford-iiit-pet/{images, annotations/{list.txt (6 '#' lines), trainval.txt, test.txt}} and a stray
    file in images/; class ids in case-insensitive alphabetical order; returns the dataset folder."""
    base = os.path.join(root, "oxford-iiit-pet")
    rows = {"trainval": [], "test": []}
    breed_ids = {1: 0, 2: 0}
    for class_id, (breed, species) in enumerate(sorted(PET_BREEDS, key=lambda b: b[0].lower()), start=1):
        breed_ids[species] += 1
        for i in range(per_class):
            image_id = f"{breed}_{100 + i}"
            _image(os.path.join(base, "images", image_id + ".jpg"), (44, 40), 11 * class_id + i, placeholder)
            rows["trainval" if i % 2 == 0 else "test"].append(f"{image_id} {class_id} {species} {breed_ids[species]}")
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    header = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog",
              "#BREED ID: 1-25:Cat 1:12:Dog", "#All images with 1st letter as captial are cat images",
              "#images with small first letter are dog images"]
    for name, lines in (("trainval.txt", rows["trainval"]), ("test.txt", rows["test"]),
                        ("list.txt", header + rows["trainval"] + rows["test"])):
        with open(os.path.join(base, "annotations", name), "w") as f:
            f.write("\n".join(lines) + "\n")
    open(os.path.join(base, "images", "stray.mat"), "wb").close()  # the archive's rogue files
    return base


FOOD_CLASSES = ["apple_pie", "cheesecake", "cheese_plate", "waffles"]  # the official order: not sorted


def write_food101(root, per_class=4, placeholder=False):
    """food-101/{images/<class>/<id>.jpg, meta/{classes.txt, train.txt, test.txt, train.json, test.json}}."""
    import json

    base = os.path.join(root, "food-101")
    split = {"train": {}, "test": {}}
    for c, name in enumerate(FOOD_CLASSES):
        for i in range(per_class):
            image_id = f"{name}/{1000 * (c + 1) + i}"
            _image(os.path.join(base, "images", image_id + ".jpg"), (40, 40), 13 * c + i, placeholder)
            split["train" if i % 2 == 0 else "test"].setdefault(name, []).append(image_id)
    os.makedirs(os.path.join(base, "meta"), exist_ok=True)
    with open(os.path.join(base, "meta", "classes.txt"), "w") as f:
        f.write("\n".join(FOOD_CLASSES) + "\n")
    for name, table in split.items():
        with open(os.path.join(base, "meta", f"{name}.txt"), "w") as f:
            f.write("\n".join(i for ids in table.values() for i in ids) + "\n")
        with open(os.path.join(base, "meta", f"{name}.json"), "w") as f:
            json.dump(table, f)
    return base


INAT_FOLDERS = {"2017": "train_val_images/{super}/{name}", "2018": "train_val2018/{super}/{id}",
                "2021": "{split}/{id:05d}_Animalia_Chordata_Aves_Order_Family_Genus_{name}",
                "2021_mini": "{split}/{id:05d}_Animalia_Chordata_Aves_Order_Family_Genus_{name}"}


def write_inaturalist(root, version="2021_mini", per_class=3, placeholder=False):
    """The JSON files and image folders of one iNaturalist version; category ids in an order that is not the
    folder order (names sort the other way round); returns the dataset folder."""
    import json

    from datamodules.inaturalist import FILES

    base = os.path.join(root, f"inat{version}")
    categories = [{"id": k, "name": name, "supercategory": "Aves"} for k, name in enumerate(["zebra finch", "robin",
                                                                                          "mallard"])]
    content = {}
    image_id = 0
    for split_file, split in zip(FILES[version], ("train", "val", "test")):
        folder_split = {"2021_mini": {"train": "train_mini"}}.get(version, {}).get(split, split)
        images, annotations = [], []
        for category in categories:
            for i in range(per_class if split != "test" else 1):
                image_id += 1
                if split == "test":
                    rel = f"{'public_test' if version.startswith('2021') else 'test' + version}/{image_id:08x}.jpg"
                else:
                    rel = INAT_FOLDERS[version].format(super="Aves", name=category["name"].replace(" ", "_"),
                                                       id=category["id"], split=folder_split) + f"/{image_id:08x}.jpg"
                _image(os.path.join(base, rel), (36, 32), image_id, placeholder)
                images.append({"id": image_id, "file_name": rel, "width": 36, "height": 32})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": category["id"]})
        content[split_file] = {"info": {}, "images": images, "categories": categories, "licenses": []}
        if split != "test":
            content[split_file]["annotations"] = annotations
    for name, data in content.items():
        with open(os.path.join(base, name), "w") as f:
            json.dump(data, f)
    return base
