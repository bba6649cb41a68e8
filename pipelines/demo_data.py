"""Deterministic, realistic raw payloads for the demo and benchmarks.

Simulates users of Garmin (push bodies), Oura v2 (collection documents) and WHOOP v2 (records)
over several days, the way the real APIs send them: dailies re-sent as the day fills up, sleeps
going from tentative to final, Oura documents re-versioned, WHOOP scores arriving after the
record, duplicate deliveries, and a few malformed payloads that must end up as dead letters.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone

from core.raw import RawPayload

START_DAY = date(2026, 11, 1)
OFFSETS_MIN = [-480, -300, -240, 0, 60, 120, 330, 540, 600]


def _j(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _z(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Simulator:
    def __init__(self, users: int, days: int, seed: int = 7, duplicate_rate: float = 0.05) -> None:
        self.rng = random.Random(seed)
        self.users, self.days, self.duplicate_rate = users, days, duplicate_rate
        self.received = int(datetime.combine(START_DAY, datetime.min.time(), tzinfo=UTC).timestamp() * 1000)

    def _payload(self, provider: str, body: object, kind: str | None = None,
                 user: str | None = None) -> Iterator[RawPayload]:
        self.received += self.rng.randint(50, 4000)
        raw = RawPayload(provider, _j(body), kind, user, self.received)
        yield raw
        if self.rng.random() < self.duplicate_rate:  # providers retry deliveries
            yield raw

    def payloads(self) -> Iterator[RawPayload]:
        people = [(["garmin", "oura", "whoop"][i % 3], i) for i in range(self.users)]
        for day_index in range(self.days):
            day = START_DAY + timedelta(days=day_index)
            for provider, index in people:
                yield from getattr(self, provider)(index, day)
        yield from self.malformed()

    # --- Garmin -------------------------------------------------------------------------------
    def garmin(self, index: int, day: date) -> Iterator[RawPayload]:
        rng = self.rng
        user = f"{uuid.UUID(int=index * 7919).hex}"
        offset = OFFSETS_MIN[index % len(OFFSETS_MIN)] * 60
        tz = timezone(timedelta(seconds=offset))
        midnight = datetime.combine(day, datetime.min.time(), tzinfo=tz)
        start = int(midnight.timestamp())
        steps_total = rng.randint(4000, 16000)
        for fraction in (0.4, 0.75, 1.0):  # the day fills up: each push is a superset
            duration = int(86400 * fraction)
            hr = {str(s): rng.randint(52, 120) for s in range(0, duration, 900)}
            yield from self._payload("garmin", {"dailies": [{
                "userId": user, "summaryId": f"x{index:05x}-{start:x}", "calendarDate": day.isoformat(),
                "startTimeInSeconds": start, "startTimeOffsetInSeconds": offset, "durationInSeconds": duration,
                "steps": int(steps_total * fraction), "distanceInMeters": round(steps_total * fraction * 0.78, 1),
                "activeTimeInSeconds": int(4200 * fraction), "activeKilocalories": int(600 * fraction),
                "bmrKilocalories": int(1700 * fraction), "floorsClimbed": int(12 * fraction),
                "minHeartRateInBeatsPerMinute": 48, "maxHeartRateInBeatsPerMinute": 151,
                "restingHeartRateInBeatsPerMinute": rng.randint(48, 60), "averageHeartRateInBeatsPerMinute": 70,
                "timeOffsetHeartRateSamples": hr, "averageStressLevel": rng.choice([-1, 22, 31, 45]),
                "maxStressLevel": 88, "stressQualifier": rng.choice(["calm", "balanced", "stressful_awake"]),
                "moderateIntensityDurationInSeconds": 1800, "vigorousIntensityDurationInSeconds": 600}]},
                user=user)
        epochs = []
        for slot in range(8 * 4, 20 * 4, 2):  # daytime epochs, 15 minutes each
            at = start + slot * 900
            kind = rng.choice(["SEDENTARY", "WALKING", "RUNNING"])
            epochs.append({"userId": user, "summaryId": f"x{index:05x}-{at:x}-{kind[:3]}", "startTimeInSeconds": at,
                           "startTimeOffsetInSeconds": offset, "activityType": kind, "durationInSeconds": 900,
                           "activeTimeInSeconds": rng.randint(0, 900), "steps": rng.randint(0, 1500),
                           "distanceInMeters": rng.randint(0, 1100), "activeKilocalories": rng.randint(0, 90),
                           "met": round(rng.uniform(1.0, 9.0), 2),
                           "intensity": {"SEDENTARY": "SEDENTARY", "WALKING": "ACTIVE"}.get(kind, "HIGHLY_ACTIVE"),
                           "meanMotionIntensity": 2.0, "maxMotionIntensity": 5.0})
        yield from self._payload("garmin", {"epochs": epochs}, user=user)
        sleep_start = start - rng.randint(3600, 7200)
        deep, light, rem, awake = 5400, 13800 + rng.randint(0, 1800), 6000, 1500
        levels = {"light": [], "deep": [], "rem": [], "awake": []}
        cursor = sleep_start
        for stage, length in [("light", 3600), ("deep", 2700), ("light", 5400), ("rem", 3000), ("deep", 2700),
                              ("light", 4800 + light - 13800), ("awake", awake), ("rem", 3000)]:
            levels[stage].append({"startTimeInSeconds": cursor, "endTimeInSeconds": cursor + length})
            cursor += length
        for validation in ("ENHANCED_TENTATIVE", "ENHANCED_FINAL"):
            yield from self._payload("garmin", {"sleeps": [{
                "userId": user, "summaryId": f"x{index:05x}-{sleep_start:x}", "calendarDate": day.isoformat(),
                "startTimeInSeconds": sleep_start, "startTimeOffsetInSeconds": offset,
                "durationInSeconds": deep + light + rem, "deepSleepDurationInSeconds": deep,
                "lightSleepDurationInSeconds": light, "remSleepInSeconds": rem, "awakeDurationInSeconds": awake,
                "unmeasurableSleepInSeconds": 0, "validation": validation, "sleepLevelsMap": levels,
                "timeOffsetSleepRespiration": {str(s): round(rng.uniform(12, 17), 1) for s in range(0, 28800, 1800)},
                "timeOffsetSleepSpo2": {str(s): rng.randint(91, 99) for s in range(0, 28800, 3600)},
                "overallSleepScore": {"value": rng.randint(55, 95), "qualifierKey": "GOOD"}, "naps": []}]},
                user=user)
        if (index + day.toordinal()) % 2 == 0:
            yield from self._garmin_activity(user, index, start + 18 * 3600, offset)
        if day.weekday() == 0:
            yield from self._payload("garmin", {"bodyComps": [{
                "userId": user, "summaryId": f"x{index:05x}-bc-{start:x}", "measurementTimeInSeconds": start + 7 * 3600,
                "measurementTimeOffsetInSeconds": offset, "weightInGrams": rng.randint(55000, 95000),
                "bodyFatInPercent": round(rng.uniform(12, 30), 1), "bodyMassIndex": round(rng.uniform(19, 29), 1),
                "muscleMassInGrams": rng.randint(25000, 40000), "boneMassInGrams": rng.randint(2500, 3500),
                "bodyWaterInPercent": round(rng.uniform(50, 62), 1)}]}, user=user)
        if index % 6 == 0 and day_index_is_first(day):
            updated = start + 9 * 3600
            yield from self._payload("garmin", {"mct": [{
                "userId": user, "summaryId": f"x{index:05x}-{updated * 1000:x}", "periodStartDate":
                (day - timedelta(days=9)).isoformat(), "dayInCycle": 10, "periodLength": 5, "currentPhase": 2,
                "currentPhaseType": "FOLLICULAR", "lengthOfCurrentPhase": 8, "daysUntilNextPhase": 3,
                "predictedCycleLength": 29, "isPredictedCycle": True, "cycleLength": 29,
                "lastUpdatedTimeInSeconds": updated, "fertileWindowStart": 12, "lengthOfFertileWindow": 6,
                "pregnancySnapshot": {}}]}, user=user)

    def _garmin_activity(self, user: str, index: int, start: int, offset: int) -> Iterator[RawPayload]:
        rng = self.rng
        activity_id = 10_000_000_000 + index * 1000 + start % 997
        duration = rng.randint(1800, 4200)
        distance = round(duration * rng.uniform(2.4, 3.6), 1)
        summary = {"userId": user, "summaryId": str(activity_id), "activityId": activity_id,
                   "activityName": "Evening Run", "activityType": rng.choice(["RUNNING", "TRAIL_RUNNING", "CYCLING"]),
                   "startTimeInSeconds": start, "startTimeOffsetInSeconds": offset, "durationInSeconds": duration,
                   "distanceInMeters": distance, "averageHeartRateInBeatsPerMinute": rng.randint(128, 160),
                   "maxHeartRateInBeatsPerMinute": rng.randint(165, 185), "activeKilocalories": rng.randint(300, 900),
                   "averageSpeedInMetersPerSecond": round(distance / duration, 2), "steps": int(distance * 1.3),
                   "totalElevationGainInMeters": rng.randint(5, 250), "deviceName": "Forerunner 965", "manual": False}
        yield from self._payload("garmin", {"activities": [summary]}, user=user)
        samples = [{"startTimeInSeconds": start + s, "heartRate": rng.randint(120, 175),
                    "speedMetersPerSecond": round(rng.uniform(2.2, 3.8), 2),
                    "totalDistanceInMeters": round(distance * s / duration, 1),
                    "latitudeInDegree": 51.5 + s / 100000, "longitudeInDegree": -0.12 + s / 100000,
                    "elevationInMeters": 30 + (s % 600) / 20, "timerDurationInSeconds": s}
                   for s in range(0, duration, 60)]
        yield from self._payload("garmin", {"activityDetails": [{
            "userId": user, "summaryId": f"{activity_id}-detail", "activityId": activity_id,
            "summary": {k: v for k, v in summary.items() if k != "userId"}, "samples": samples,
            "laps": [{"startTimeInSeconds": start}, {"startTimeInSeconds": start + duration // 2}]}]}, user=user)

    # --- Oura ---------------------------------------------------------------------------------
    def oura(self, index: int, day: date) -> Iterator[RawPayload]:
        rng = self.rng
        user = f"oura-{index:05d}"
        tz = timezone(timedelta(minutes=OFFSETS_MIN[index % len(OFFSETS_MIN)]))
        bed = datetime.combine(day - timedelta(days=1), datetime.min.time(), tzinfo=tz) + timedelta(
            hours=22, minutes=rng.randint(0, 120))
        in_bed = rng.randint(25000, 31000)
        phases = "".join(rng.choice("1222334") for _ in range(in_bed // 300))
        sleep_id = str(uuid.UUID(int=(index << 20) + day.toordinal()))
        for version in (1, 2):  # Oura re-analyses the night (meta.version goes up)
            updated = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=6 + version)
            yield from self._payload("oura", {"data": [{
                "id": sleep_id, "day": day.isoformat(), "type": "long_sleep", "bedtime_start": _iso(bed),
                "bedtime_end": _iso(bed + timedelta(seconds=in_bed)), "time_in_bed": in_bed,
                "total_sleep_duration": in_bed - 2100, "awake_time": 2100, "light_sleep_duration": in_bed - 9000,
                "deep_sleep_duration": 4200, "rem_sleep_duration": 2700, "latency": 600, "efficiency": 92,
                "average_heart_rate": 54.5, "lowest_heart_rate": 48, "average_hrv": 58, "average_breath": 14.8,
                "heart_rate": {"interval": 300.0, "items": [None] + [float(rng.randint(47, 62)) for _ in range(20)],
                               "timestamp": _iso(bed)},
                "hrv": {"interval": 300.0, "items": [float(rng.randint(30, 90)) for _ in range(20)],
                        "timestamp": _iso(bed)},
                "sleep_phase_5_min": phases,
                "readiness": {"score": rng.randint(60, 95), "temperature_deviation": round(rng.uniform(-0.5, 0.5), 2)},
                "meta": {"updated_at": _z(updated), "version": version}}], "next_token": None},
                kind="sleep", user=user)
        midnight = datetime.combine(day, datetime.min.time(), tzinfo=tz)
        yield from self._payload("oura", {"data": [{
            "id": str(uuid.UUID(int=(index << 24) + day.toordinal())), "day": day.isoformat(),
            "timestamp": _iso(midnight + timedelta(hours=4)), "score": rng.randint(60, 99),
            "active_calories": rng.randint(200, 900), "total_calories": rng.randint(2000, 3200), "steps":
            rng.randint(3000, 15000), "equivalent_walking_distance": rng.randint(2000, 12000),
            "high_activity_time": 600, "medium_activity_time": 2400, "low_activity_time": 14000,
            "sedentary_time": 30000, "resting_time": 28000, "non_wear_time": 600,
            "met": {"interval": 60.0, "items": [round(rng.uniform(0.9, 5), 1) for _ in range(30)],
                    "timestamp": _iso(midnight + timedelta(hours=4))},
            "class_5_min": "".join(rng.choice("012345") for _ in range(48))}], "next_token": None},
            kind="daily_activity", user=user)
        yield from self._payload("oura", {"data": [{
            "id": str(uuid.UUID(int=(index << 28) + day.toordinal())), "day": day.isoformat(),
            "score": rng.randint(55, 95), "timestamp": _iso(midnight),
            "contributors": {"deep_sleep": 80, "efficiency": 90, "latency": 70, "rem_sleep": 75,
                             "restfulness": 60, "timing": 85, "total_sleep": 88}}], "next_token": None},
            kind="daily_sleep", user=user)
        if (index + day.toordinal()) % 3 == 0:
            start = midnight + timedelta(hours=17, minutes=rng.randint(0, 59))
            yield from self._payload("oura", {"data": [{
                "id": str(uuid.UUID(int=(index << 32) + day.toordinal())), "activity": rng.choice(
                    ["walking", "running", "cycling", "yoga"]), "calories": rng.randint(100, 700), "day":
                day.isoformat(), "distance": rng.randint(1000, 12000), "start_datetime": _iso(start),
                "end_datetime": _iso(start + timedelta(minutes=rng.randint(20, 90))), "intensity": "moderate",
                "label": None, "source": "autodetected"}], "next_token": None}, kind="workout", user=user)
        # as the poller publishes them: each UTC row with the user's offset its hook attaches (``_offset``)
        offset = _iso(midnight)[-6:]
        rows = [{"bpm": rng.randint(50, 130), "source": "awake", "_offset": offset,
                 "timestamp": _z(midnight + timedelta(minutes=30 * n))} for n in range(48)]
        yield from self._payload("oura", {"data": rows, "next_token": None}, kind="heartrate", user=user)

    # --- WHOOP --------------------------------------------------------------------------------
    def whoop(self, index: int, day: date) -> Iterator[RawPayload]:
        rng = self.rng
        user_id = 200000 + index
        offset = OFFSETS_MIN[index % len(OFFSETS_MIN)]
        tz = timezone(timedelta(minutes=offset))
        sign = "-" if offset < 0 else "+"
        tz_text = f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
        sleep_start = datetime.combine(day - timedelta(days=1), datetime.min.time(), tzinfo=tz) + timedelta(
            hours=22, minutes=rng.randint(0, 90))
        in_bed = rng.randint(25000, 31000) * 1000
        sleep_end = sleep_start + timedelta(milliseconds=in_bed)
        cycle_id = 1_000_000_000 + index * 1000 + day.toordinal() % 1000
        sleep_id = str(uuid.UUID(int=(index << 40) + day.toordinal()))
        created = sleep_end + timedelta(minutes=5)
        base = {"id": sleep_id, "cycle_id": cycle_id, "user_id": user_id, "nap": False, "created_at": _z(created),
                "start": _z(sleep_start), "end": _z(sleep_end), "timezone_offset": tz_text}
        yield from self._payload("whoop", {"records": [dict(base, updated_at=_z(created), score_state="PENDING_SCORE")],
                                           "next_token": None}, kind="sleep")
        scored = dict(base, updated_at=_z(created + timedelta(minutes=10)), score_state="SCORED", score={
            "stage_summary": {"total_in_bed_time_milli": in_bed, "total_awake_time_milli": 1_800_000,
                              "total_no_data_time_milli": 0, "total_light_sleep_time_milli": in_bed - 9_000_000,
                              "total_slow_wave_sleep_time_milli": 4_500_000, "total_rem_sleep_time_milli": 2_700_000,
                              "sleep_cycle_count": 4, "disturbance_count": rng.randint(3, 15)},
            "respiratory_rate": round(rng.uniform(13, 17), 2), "sleep_performance_percentage": rng.randint(60, 99),
            "sleep_consistency_percentage": rng.randint(50, 95), "sleep_efficiency_percentage":
            round(rng.uniform(80, 97), 2)})
        yield from self._payload("whoop", {"records": [scored], "next_token": None}, kind="sleep")
        # WHOOP's collector attaches the recovery's sleep (a recovery has no times of its own).
        yield from self._payload("whoop", {"records": [{
            "sleep": scored, "cycle_id": cycle_id, "sleep_id": sleep_id, "user_id": user_id, "created_at": _z(created),
            "updated_at": _z(created + timedelta(minutes=12)), "score_state": "SCORED", "score": {
                "user_calibrating": False, "recovery_score": rng.randint(20, 99), "resting_heart_rate":
                rng.randint(44, 62), "hrv_rmssd_milli": round(rng.uniform(30, 110), 2), "spo2_percentage":
                round(rng.uniform(94, 99), 1), "skin_temp_celsius": round(rng.uniform(33, 35), 2)}}],
            "next_token": None}, kind="recovery")
        cycle_end = sleep_start + timedelta(days=1)
        yield from self._payload("whoop", {"records": [{
            "id": cycle_id, "user_id": user_id, "created_at": _z(sleep_start), "updated_at": _z(cycle_end),
            "start": _z(sleep_start), "end": _z(cycle_end), "timezone_offset": tz_text, "score_state": "SCORED",
            "score": {"strain": round(rng.uniform(4, 19), 2), "kilojoule": rng.randint(7000, 14000),
                      "average_heart_rate": rng.randint(60, 80), "max_heart_rate": rng.randint(150, 190)}}],
            "next_token": None}, kind="cycle")
        if (index + day.toordinal()) % 2 == 1:
            start = sleep_end + timedelta(hours=10)
            yield from self._payload("whoop", {"records": [{
                "id": str(uuid.UUID(int=(index << 48) + day.toordinal())), "user_id": user_id,
                "created_at": _z(start + timedelta(hours=1)), "updated_at": _z(start + timedelta(hours=1)),
                "start": _z(start), "end": _z(start + timedelta(minutes=50)), "timezone_offset": tz_text,
                "sport_name": rng.choice(["running", "cycling", "functional-fitness", "hiit"]),
                "score_state": "SCORED", "score": {
                    "strain": round(rng.uniform(5, 16), 2), "average_heart_rate": 141, "max_heart_rate": 176,
                    "kilojoule": rng.randint(1200, 3500), "percent_recorded": 100, "distance_meter":
                    rng.randint(3000, 15000), "altitude_gain_meter": 45.5, "altitude_change_meter": 2.0,
                    "zone_durations": {"zone_zero_milli": 60000, "zone_one_milli": 300000, "zone_two_milli":
                                       900000, "zone_three_milli": 1200000, "zone_four_milli": 420000,
                                       "zone_five_milli": 120000}}}], "next_token": None}, kind="workout")

    # --- what must be dead-lettered -------------------------------------------------------------
    def malformed(self) -> Iterator[RawPayload]:
        yield RawPayload("garmin", b'{"dailies": [{"userId": "broken", "summaryId": ', received_at_ms=self.received)
        yield RawPayload("garmin", _j({"dailies": [{"userId": "no-start", "summaryId": "x1"}]}),
                         received_at_ms=self.received)
        yield RawPayload("garmin", _j({"futureSummaryType": [{"userId": "u", "summaryId": "m1"}]}),
                         received_at_ms=self.received)
        yield RawPayload("oura", _j({"data": [{"id": "no-times", "day": "2026-11-01"}]}), kind="sleep",
                         user_id="oura-bad", received_at_ms=self.received)
        yield RawPayload("acme_band", _j({"steps": []}), kind="steps", user_id="x", received_at_ms=self.received)


def day_index_is_first(day: date) -> bool:
    return day == START_DAY


def garmin_daily(user: str, day: str = "2024-03-11", steps: int = 1234) -> RawPayload:
    """One Garmin daily summary push for ``user`` (a small, valid raw event for streaming checks)."""
    start = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())
    return RawPayload("garmin", _j({"dailies": [{"userId": user, "summaryId": f"{user}-{day}", "calendarDate": day,
                                                 "startTimeInSeconds": start, "startTimeOffsetInSeconds": 0,
                                                 "durationInSeconds": 86400, "steps": steps,
                                                 "activeKilocalories": 321}]}), "dailies")
