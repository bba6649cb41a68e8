"""Fitbit activity log ``activityTypeId`` / ``activityName`` → Terra ActivityType (integer enum).

The id table holds only ids seen in public Fitbit payloads; everything else goes by ``activityName``
(Fitbit's display name of the type: "Run", "Outdoor Bike", "Weights", …; case and surrounding spaces
ignored). What neither table knows, and generic types ("Sport", "Workout"), map to OTHER (108).
"""

OTHER = 108

FITBIT_ACTIVITY_TYPE_IDS: dict[int, int] = {
    90001: 1,  # Bike → BIKING
    90009: 8,  # Run → RUNNING
    90013: 7,  # Walk → WALKING
    90024: 82,  # Swim → SWIMMING
    2040: 22,  # Circuit Training → CIRCUIT_TRAINING
    2131: 80,  # Weights → STRENGTH_TRAINING
    15200: 26,  # Fencing → FENCING
    15580: 61,  # Skateboarding → SKATEBOARDING
}

FITBIT_ACTIVITY_NAMES: dict[str, int] = {
    "run": 8, "running": 8, "treadmill": 88, "treadmill run": 58, "walk": 7, "walking": 7, "hike": 35, "hiking": 35,
    "bike": 1, "biking": 1, "outdoor bike": 1, "bicycling": 1, "spinning": 17, "indoor bike": 18,
    "swim": 82, "swimming": 82, "elliptical": 25, "rowing machine": 54, "rowing": 53, "stairclimber": 78,
    "weights": 80, "weight training": 80, "weight lifting": 97, "strength training": 80, "circuit training": 22,
    "crossfit": 113, "hiit": 114, "interval workout": 115, "aerobic workout": 9, "aerobics": 9, "yoga": 100,
    "pilates": 49, "stretching": 125, "meditation": 45, "dancing": 24, "dance": 24, "zumba": 101,
    "kickboxing": 42, "boxing": 20, "martial arts": 44, "fencing": 26, "tennis": 87, "golf": 32, "soccer": 29,
    "basketball": 12, "volleyball": 89, "skateboarding": 61, "kayaking": 40, "rock climbing": 52,
    "sport": OTHER, "workout": OTHER,
}


def terra_activity_type(type_id: int | None, name: str | None) -> int:
    """Terra ActivityType of a Fitbit activity log: by ``activityTypeId``, then ``activityName``, else OTHER."""
    if isinstance(type_id, int) and not isinstance(type_id, bool) and type_id in FITBIT_ACTIVITY_TYPE_IDS:
        return FITBIT_ACTIVITY_TYPE_IDS[type_id]
    return FITBIT_ACTIVITY_NAMES.get((name or "").strip().lower(), OTHER)
