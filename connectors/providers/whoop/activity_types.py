"""WHOOP workout ``sport_name`` → Terra ActivityType (integer enum). Unknown sports map to OTHER (108).

WHOOP sends lower-case hyphenated slugs ("hiking-rucking"); keys here use underscores and the lookup
normalizes hyphens and spaces, so display names ("Hiking/Rucking" aside) match too.
"""

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


def terra_activity_type(sport_name: str | None) -> int:
    """Terra ActivityType for a WHOOP sport_name."""
    key = (sport_name or "").strip().lower().replace("-", "_").replace(" ", "_")
    return WHOOP_ACTIVITY_TYPES.get(key, OTHER)
