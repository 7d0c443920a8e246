from setuptools import find_packages, setup

setup(
    name="pg-backup-api",
    version="0.1.0",
    description="A REST API that drives Barman, the PostgreSQL backup manager",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    packages=find_packages(include=["pg_backup_api", "pg_backup_api.*"]),
    package_data={"pg_backup_api.rules": ["openapi.json"], "pg_backup_api.http": ["templates/*.html", "static/*"]},
    python_requires=">=3.9",
    # The minimums are what Debian 12 ships (python3-flask 2.2.2, python3-requests 2.28.1,
    # python3-jsonschema 4.10.3, python3-prometheus-client 0.16.0): the Debian package uses those.
    install_requires=["flask>=2.2", "requests>=2.28", "barman>=3.4,<4", "jsonschema>=4.10", "prometheus_client>=0.16",
                      # The operation index asks the kernel which job files appeared (Linux only). Optional
                      # in the code (watch.py lists jobs/ without it): Debian does not package it.
                      "inotify_simple>=1.3; sys_platform == 'linux'"],
    entry_points={"console_scripts": ["pg-backup-api = pg_backup_api.cli:main"]},
    classifiers=["Programming Language :: Python :: 3"],
)
