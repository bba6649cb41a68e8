"""Oura workout ``activity`` → Terra ActivityType (integer enum). Unknown activities map to OTHER (108)."""

OTHER = 108

OURA_ACTIVITY_TYPES: dict[str, int] = {
    "walking": 7, "running": 8, "trail_running": 149, "treadmill_running": 58, "indoor_running": 133,
    "hiking": 35, "cycling": 1, "road_biking": 16, "mountain_biking": 15, "indoor_cycling": 18, "spinning": 17,
    "swimming": 82, "rowing": 53, "rowing_machine": 54, "kayaking": 40, "canoeing": 140, "stand_up_paddling": 79,
    "surfing": 81, "sailing": 59, "water_polo": 96, "strength_training": 80, "weightlifting": 97,
    "functional_training": 123, "cardio_training": 123, "hiit": 114, "circuit_training": 22, "crossfit": 113,
    "elliptical": 25, "stair_climbing": 77, "jump_rope": 39, "yoga": 100, "pilates": 49, "stretching": 125,
    "meditation": 45, "breathwork": 122, "dancing": 24, "dance": 24, "aerobics": 9, "zumba": 101,
    "skiing": 65, "downhill_skiing": 68, "cross_country_skiing": 67, "snowboarding": 73, "ice_skating": 104,
    "skating": 62, "inline_skating": 127, "skateboarding": 61, "soccer": 29, "basketball": 12, "volleyball": 89,
    "baseball": 11, "softball": 120, "rugby": 55, "cricket": 23, "handball": 34, "lacrosse": 124,
    "american_football": 27, "hockey": 36, "ice_hockey": 36, "field_hockey": 36, "tennis": 87, "squash": 76,
    "badminton": 10, "table_tennis": 85, "padel": 134, "boxing": 20, "kickboxing": 42, "martial_arts": 44,
    "fencing": 26, "climbing": 52, "rock_climbing": 52, "golf": 32, "horseback_riding": 37, "gymnastics": 33,
    "triathlon": 126, "gardening": 31, "housework": 38, "wheelchair": 98, "other": OTHER,
}


def terra_activity_type(oura_activity: str | None) -> int:
    """Terra ActivityType for an Oura activity string (case, spaces and hyphens ignored)."""
    key = (oura_activity or "").strip().lower().replace("-", "_").replace(" ", "_")
    return OURA_ACTIVITY_TYPES.get(key, OTHER)
