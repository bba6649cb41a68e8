"""Withings workout ``category`` → (Terra ActivityType, Withings label). Unknown categories map to OTHER (108)."""

OTHER = 108

WITHINGS_WORKOUT_CATEGORIES: dict[int, tuple[int, str]] = {
    1: (7, "Walk"), 2: (8, "Run"), 3: (35, "Hiking"), 4: (62, "Skating"), 5: (1, "BMX"), 6: (1, "Bicycling"),
    7: (82, "Swimming"), 8: (81, "Surfing"), 9: (43, "Kitesurfing"), 10: (99, "Windsurfing"), 11: (81, "Bodyboard"),
    12: (87, "Tennis"), 13: (85, "Table tennis"), 14: (76, "Squash"), 15: (10, "Badminton"),
    16: (97, "Lift weights"), 17: (21, "Calisthenics"), 18: (25, "Elliptical"), 19: (49, "Pilates"),
    20: (12, "Basketball"), 21: (29, "Soccer"), 22: (27, "Football"), 23: (55, "Rugby"), 24: (89, "Volleyball"),
    25: (96, "Water polo"), 26: (37, "Horse riding"), 27: (32, "Golf"), 28: (100, "Yoga"), 29: (24, "Dancing"),
    30: (20, "Boxing"), 31: (26, "Fencing"), 32: (44, "Wrestling"), 33: (44, "Martial arts"), 34: (65, "Skiing"),
    35: (73, "Snowboarding"), 36: (OTHER, "Other"), 187: (53, "Rowing"), 188: (101, "Zumba"), 191: (11, "Baseball"),
    192: (34, "Handball"), 193: (36, "Hockey"), 194: (36, "Ice hockey"), 195: (52, "Climbing"),
    196: (104, "Ice skating"), 272: (151, "Multi-sport"), 306: (95, "Indoor walk"), 307: (133, "Indoor running"),
    308: (18, "Indoor cycling"),
}


def terra_activity_type(category: int | None) -> tuple[int, str | None]:
    """Terra ActivityType and Withings' label for a workout category (OTHER and no label when unknown)."""
    return WITHINGS_WORKOUT_CATEGORIES.get(category, (OTHER, None)) if isinstance(category, int) else (OTHER, None)
