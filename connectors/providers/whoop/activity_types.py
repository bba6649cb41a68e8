"""WHOOP workout sport → Terra ActivityType (integer enum). Unknown sports map to OTHER (108).

v2 workouts name their sport in ``sport_name``: lower-case hyphenated slugs ("hiking-rucking"). Keys here use
underscores and the lookup folds case, hyphens, spaces, "/" and "&", so WHOOP's display names ("Hiking/Rucking",
"Track & Field") match too.

v1 workouts (and v2 ones before 09/01/2025 beside ``sport_name``) carry ``sport_id``: ``WHOOP_SPORT_NAME_BY_ID`` is
the "WHOOP Sports" table of WHOOP's workout documentation (developer.whoop.com/docs/developing/user-data/workout;
the same table is reproduced in public clients such as ferueda/go-whoop's ``Sports``). An id missing from it is
OTHER with no name; ids are never guessed.
"""

import re

OTHER = 108

WHOOP_ACTIVITY_TYPES: dict[str, int] = {
    "running": 8, "track_field": 8, "walking": 7, "stroller_walking": 116, "stroller_jogging": 56, "dog_walking": 7,
    "hiking_rucking": 35, "hiking": 35, "cycling": 1, "mountain_biking": 15, "spin": 17, "assault_bike": 18,
    "swimming": 82, "water_polo": 96, "rowing": 53, "kayaking": 40, "paddleboarding": 79, "surfing": 81,
    "sailing": 59, "diving": 102, "water_skiing": 132, "wakeboarding": 92, "kite_boarding": 43,
    "weightlifting": 97, "powerlifting": 97, "strength_trainer": 80, "functional_fitness": 113, "hiit": 114,
    "elliptical": 25, "stairmaster": 78, "stadium_steps": 77, "jumping_rope": 39, "yoga": 100, "hot_yoga": 100,
    "pilates": 49, "stretching": 125, "meditation": 45, "skiing": 65, "cross_country_skiing": 67,
    "snowboarding": 73, "ice_skating": 104, "soccer": 29, "basketball": 12, "football": 27,
    "australian_football": 28, "gaelic_football": 147, "hurling_camogie": 148, "baseball": 11, "softball": 120,
    "volleyball": 89, "rugby": 55, "lacrosse": 124, "cricket": 23, "ice_hockey": 36, "field_hockey": 36,
    "handball": 34, "tennis": 87, "squash": 76, "badminton": 10, "table_tennis": 85, "padel": 134,
    "boxing": 20, "kickboxing": 42, "box_fitness": 20, "martial_arts": 44, "jiu_jitsu": 44, "fencing": 26,
    "rock_climbing": 52, "golf": 32, "inline_skating": 127, "skateboarding": 61, "horseback_riding": 37,
    "polo": 50, "triathlon": 126, "motocross": 137, "motor_racing": 138, "dance": 24, "gymnastics": 33,
    "wheelchair_pushing": 98, "yard_work": 31, "cleaning": 38, "activity": OTHER, "other": OTHER,
}

# WHOOP's documented sport ids (developer.whoop.com, "WHOOP Sports"), by id, with WHOOP's display names.
WHOOP_SPORT_NAME_BY_ID: dict[int, str] = {
    -1: "Activity", 0: "Running", 1: "Cycling", 16: "Baseball", 17: "Basketball", 18: "Rowing", 19: "Fencing",
    20: "Field Hockey", 21: "Football", 22: "Golf", 24: "Ice Hockey", 25: "Lacrosse", 27: "Rugby", 28: "Sailing",
    29: "Skiing", 30: "Soccer", 31: "Softball", 32: "Squash", 33: "Swimming", 34: "Tennis", 35: "Track & Field",
    36: "Volleyball", 37: "Water Polo", 38: "Wrestling", 39: "Boxing", 42: "Dance", 43: "Pilates", 44: "Yoga",
    45: "Weightlifting", 47: "Cross Country Skiing", 48: "Functional Fitness", 49: "Duathlon", 51: "Gymnastics",
    52: "Hiking/Rucking", 53: "Horseback Riding", 55: "Kayaking", 56: "Martial Arts", 57: "Mountain Biking",
    59: "Powerlifting", 60: "Rock Climbing", 61: "Paddleboarding", 62: "Triathlon", 63: "Walking", 64: "Surfing",
    65: "Elliptical", 66: "Stairmaster", 70: "Meditation", 71: "Other", 73: "Diving", 74: "Operations - Tactical",
    75: "Operations - Medical", 76: "Operations - Flying", 77: "Operations - Water", 82: "Ultimate", 83: "Climber",
    84: "Jumping Rope", 85: "Australian Football", 86: "Skateboarding", 87: "Coaching", 88: "Ice Bath",
    89: "Commuting", 90: "Gaming", 91: "Snowboarding", 92: "Motocross", 93: "Caddying", 94: "Obstacle Course Racing",
    95: "Motor Racing", 96: "HIIT", 97: "Spin", 98: "Jiu Jitsu", 99: "Manual Labor", 100: "Cricket",
    101: "Pickleball", 102: "Inline Skating", 103: "Box Fitness", 104: "Spikeball", 105: "Wheelchair Pushing",
    106: "Paddle Tennis", 107: "Barre", 108: "Stage Performance", 109: "High Stress Work", 110: "Parkour",
    111: "Gaelic Football", 112: "Hurling/Camogie", 113: "Circus Arts", 121: "Massage Therapy",
    123: "Strength Trainer", 125: "Watching Sports", 126: "Assault Bike", 127: "Kickboxing", 128: "Stretching",
    230: "Table Tennis", 231: "Badminton", 232: "Netball", 233: "Sauna", 234: "Disc Golf", 235: "Yard Work",
    236: "Air Compression", 237: "Percussive Massage", 238: "Paintball", 239: "Ice Skating", 240: "Handball",
    248: "F45 Training", 249: "Padel", 250: "Barry's", 251: "Dedicated Parenting", 252: "Stroller Walking",
    253: "Stroller Jogging", 254: "Toddlerwearing", 255: "Babywearing", 258: "Barre3", 259: "Hot Yoga",
    261: "Stadium Steps", 262: "Polo", 263: "Musical Performance", 264: "Kite Boarding", 266: "Dog Walking",
    267: "Water Skiing", 268: "Wakeboarding", 269: "Cooking", 270: "Cleaning", 272: "Public Speaking",
}


def terra_activity_type(sport_name: str | None) -> int:
    """Terra ActivityType for a WHOOP sport_name (slug or display name)."""
    key = re.sub(r"[\s\-/&]+", "_", (sport_name or "").strip().lower())
    return WHOOP_ACTIVITY_TYPES.get(key, OTHER)


def whoop_sport_name(sport_name: str | None, sport_id: object) -> str | None:
    """The workout's sport: v2 ``sport_name`` when sent, else the documented name of its v1 ``sport_id``."""
    if sport_name:
        return sport_name
    if isinstance(sport_id, int) and not isinstance(sport_id, bool):
        return WHOOP_SPORT_NAME_BY_ID.get(sport_id)
    return None
