"""The built-in dataset: a deterministic generator of a realistic small catalogue.

Items are composed from latent topics (category path, brand, title words, description), so
text carries signal. Users belong to taste communities (co-purchase structure between users),
have topic preferences that drift over time, and follow item-to-item transitions (series,
accessories) that a sequential model can learn. Every interaction gets a short review that
names the item it refers to. Same config + seed => byte-identical dataset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from ttds.data.dataset import TEXT_FIELDS, RecDataset, UserText
from ttds.errors import TTDSError

# (category path, nouns, adjectives, brands): the seeds of the latent topics
_TOPICS = [
    ("Video Games > Role-Playing", ["Quest", "Saga", "Chronicles", "Legends", "Odyssey"], ["Epic", "Dark", "Eternal", "Lost"], ["Square Peak", "Atlus Forge", "BioLore"]),
    ("Video Games > Racing", ["Racer", "Rally", "Drift", "Grand Prix", "Speedway"], ["Turbo", "Extreme", "Nitro", "Ultimate"], ["Velocity", "Codemasters", "Apex Studio"]),
    ("Video Games > Shooter", ["Strike", "Warfare", "Ops", "Frontline", "Assault"], ["Tactical", "Modern", "Black", "Elite"], ["Infinity Arms", "Bravo Games", "Sledge"]),
    ("Video Games > Sports", ["Football", "Basketball", "Golf", "Tennis", "Hockey"], ["Pro", "All-Star", "Champions", "Season"], ["EA Field", "2Kourt", "Victory"]),
    ("Video Games > Puzzle", ["Puzzle", "Blocks", "Match", "Logic", "Mind"], ["Clever", "Tiny", "Bright", "Zen"], ["PopThink", "Brainy", "Mosaic"]),
    ("Accessories > Controllers", ["Controller", "Gamepad", "Joystick", "Arcade Stick", "Wheel"], ["Wireless", "Wired", "Ergonomic", "Pro"], ["PowerA", "HyperGrip", "8BitPro"]),
    ("Accessories > Headsets", ["Headset", "Headphones", "Earbuds", "Microphone", "Amp"], ["Surround", "Noise-Cancelling", "Stereo", "Gaming"], ["Turtle Reef", "HyperSound", "Astra"]),
    ("Accessories > Storage", ["Memory Card", "Hard Drive", "SSD", "Carry Case", "Stand"], ["Portable", "Fast", "Compact", "Rugged"], ["Seagrove", "SanDune", "StoreMax"]),
    ("Musical Instruments > Guitars", ["Guitar", "Bass", "Ukulele", "Strings", "Pick Set"], ["Acoustic", "Electric", "Vintage", "Classic"], ["Fendell", "Gibsonic", "Yamaru"]),
    ("Musical Instruments > Keyboards", ["Keyboard", "Synthesizer", "Piano", "MIDI Controller", "Sustain Pedal"], ["Digital", "Weighted", "Analog", "Portable"], ["Korgan", "Rolend", "Casiotone"]),
    ("Musical Instruments > Drums", ["Drum Kit", "Snare", "Cymbal", "Drumsticks", "Practice Pad"], ["Electronic", "Maple", "Bronze", "Studio"], ["Pearlman", "Zildon", "Tamaya"]),
    ("Musical Instruments > Recording", ["Audio Interface", "Studio Monitor", "Condenser Mic", "Pop Filter", "Cable"], ["USB", "XLR", "Balanced", "Studio"], ["Focusrite", "Shurely", "Behring"]),
    ("Industrial & Scientific > Lab", ["Beaker", "Pipette", "Flask", "Test Tube Rack", "Centrifuge"], ["Borosilicate", "Graduated", "Sterile", "Lab-Grade"], ["LabPro", "Kimble", "Eppen"]),
    ("Industrial & Scientific > Measurement", ["Caliper", "Multimeter", "Thermometer", "Scale", "pH Meter"], ["Digital", "Precision", "Calibrated", "Handheld"], ["Mitutoya", "Flukes", "Etekcity"]),
    ("Industrial & Scientific > Safety", ["Gloves", "Goggles", "Respirator", "Ear Plugs", "Face Shield"], ["Nitrile", "Disposable", "Anti-Fog", "Reusable"], ["3Em", "Honeywell", "SafeGuard"]),
    ("Industrial & Scientific > Tape", ["Tape", "Adhesive", "Label", "Sealant", "Glue"], ["Heavy-Duty", "Double-Sided", "Masking", "Thermal"], ["Scotchy", "Gorilla Grip", "Tesa"]),
    ("Home > Kitchen", ["Knife", "Pan", "Blender", "Cutting Board", "Kettle"], ["Stainless", "Non-Stick", "Chef's", "Electric"], ["Cuisine Art", "Lodgewood", "Oxo"]),
    ("Home > Lighting", ["Lamp", "LED Strip", "Bulb", "Lantern", "Night Light"], ["Smart", "Dimmable", "Warm", "Solar"], ["Philux", "Luminar", "Govee"]),
    ("Books > Fantasy", ["Novel", "Trilogy", "Anthology", "Box Set", "Omnibus"], ["Epic", "Illustrated", "Collector's", "Hardcover"], ["Tor Press", "Orbit House", "DelRay"]),
    ("Books > Science", ["Textbook", "Handbook", "Guide", "Primer", "Workbook"], ["Complete", "Practical", "Illustrated", "Concise"], ["Wiley Hall", "Springwell", "Oreilly"]),
]
_DESC = [
    "Designed for {adj_l} {noun_l} fans.", "A {adj_l} {noun_l} from {brand}.", "Built for everyday use.",
    "Great value and long lasting.", "Compatible with most setups.", "Part of the {cat} line.",
]
_REVIEW_GOOD = ["Love this {noun_l}.", "Great {noun_l}, works as described.", "Exactly what I needed.", "Best {noun_l} I have owned."]
_REVIEW_BAD = ["The {noun_l} broke after a week.", "Not worth the price.", "Disappointed with this {noun_l}."]


@dataclass
class BuiltinConfig:
    users: int = 3000
    items: int = 2000
    topics: int = 20
    communities: int = 12
    mean_length: float = 12.0  # mean interactions per user (at least 5)
    max_length: int = 60
    p_follow: float = 0.55  # next item follows an item-to-item transition of the last item
    p_drift: float = 0.12  # the user's current topic changes
    seed: int = 0

    @classmethod
    def from_strings(cls, kv: dict[str, str]) -> "BuiltinConfig":
        types = {f.name: f.type for f in fields(cls)}
        out = {}
        for k, v in kv.items():
            if k not in types:
                raise TTDSError(f"builtin dataset option {k!r}: unknown; expected one of {', '.join(types)}")
            try:
                out[k] = float(v) if types[k] in ("float", float) else int(v)
            except ValueError:
                raise TTDSError(f"builtin dataset option {k}={v!r}: expected a number") from None
        cfg = cls(**out)
        if cfg.items < 20 or cfg.users < 10 or cfg.topics < 1 or cfg.mean_length < 5:
            raise TTDSError("builtin dataset: need items >= 20, users >= 10, topics >= 1, mean_length >= 5")
        return cfg


def generate(cfg: BuiltinConfig | None = None) -> RecDataset:
    cfg = cfg or BuiltinConfig()
    rng = np.random.default_rng(cfg.seed)
    T, I, U = cfg.topics, cfg.items, cfg.users

    # ---- items: topic, text, popularity
    topic_sizes = rng.dirichlet(np.full(T, 3.0))
    item_topic = np.sort(rng.choice(T, size=I, p=topic_sizes))
    rng.shuffle(item_topic)
    popularity = rng.zipf(1.6, size=I).clip(max=200).astype(float)
    text = {f: [] for f in TEXT_FIELDS}
    for i in range(I):
        t = int(item_topic[i])
        cat, nouns, adjs, brands = _TOPICS[t % len(_TOPICS)]
        if t >= len(_TOPICS):
            cat = f"{cat} {t // len(_TOPICS) + 1}"
        noun, adj, brand = nouns[rng.integers(len(nouns))], adjs[rng.integers(len(adjs))], brands[rng.integers(len(brands))]
        model = f"{chr(65 + rng.integers(26))}{rng.integers(100, 999)}"
        text["title"].append(f"{brand} {adj} {noun} {model}")
        text["brand"].append(brand)
        text["categories"].append(cat.replace(" > ", ","))
        d = rng.choice(len(_DESC), size=2, replace=False)
        fmt = dict(adj_l=adj.lower(), noun_l=noun.lower(), brand=brand, cat=cat.split(" > ")[-1])
        text["description"].append(" ".join(_DESC[j].format(**fmt) for j in d))
    by_topic = [np.flatnonzero(item_topic == t) for t in range(T)]

    # ---- item-to-item transitions (series / accessories): 3 successors, mostly same topic
    succ = np.empty((I, 3), dtype=np.int64)
    for i in range(I):
        for j in range(3):
            pool = by_topic[item_topic[i]] if rng.random() < 0.8 or T == 1 else by_topic[rng.integers(T)]
            if len(pool) == 0:
                pool = np.arange(I)
            succ[i, j] = pool[rng.integers(len(pool))]

    # ---- users: communities -> topic preferences; sequences with drift
    protos = rng.dirichlet(np.full(T, 0.3), size=cfg.communities)
    sequences, user_text = [], []
    for u in range(U):
        pref = 0.8 * protos[rng.integers(cfg.communities)] + 0.2 * rng.dirichlet(np.full(T, 0.3))
        pref = pref / pref.sum()
        length = int(min(cfg.max_length, 5 + rng.geometric(1.0 / (cfg.mean_length - 4))))
        length = min(length, I)
        topic = int(rng.choice(T, p=pref))
        seq: list[int] = []
        seen: set[int] = set()
        while len(seq) < length:
            if rng.random() < cfg.p_drift:
                topic = int(rng.choice(T, p=pref))
            if seq and rng.random() < cfg.p_follow:
                cand = int(succ[seq[-1], rng.integers(3)])
            else:
                pool = by_topic[topic] if len(by_topic[topic]) else np.arange(I)
                w = popularity[pool]
                cand = int(pool[rng.choice(len(pool), p=w / w.sum())])
            if cand in seen:
                cand = int(rng.integers(I)) if rng.random() < 0.3 else -1
                if cand in seen or cand < 0:
                    continue
            seq.append(cand)
            seen.add(cand)
        sequences.append(np.asarray(seq, dtype=np.int64))
        reviews = []
        for i in seq:
            cat, nouns, _, _ = _TOPICS[int(item_topic[i]) % len(_TOPICS)]
            noun_l = text["title"][i].split()[-2].lower()
            bank = _REVIEW_GOOD if rng.random() < 0.8 else _REVIEW_BAD
            reviews.append(UserText(bank[rng.integers(len(bank))].format(noun_l=noun_l), int(i)))
        user_text.append(reviews)

    ds = RecDataset(
        name="builtin",
        sequences=sequences,
        item_text=text,
        user_ids=[f"U{u:05d}" for u in range(U)],
        item_ids=[f"I{i:05d}" for i in range(I)],
        user_text=user_text,
        notes=[f"builtin dataset generated with {asdict(cfg)}"],
    )
    return ds
