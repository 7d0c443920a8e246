from setuptools import find_packages, setup

setup(
    name="pg-backup-api",
    version="0.1.0",
    description="A REST API that drives Barman, the PostgreSQL backup manager",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    packages=find_packages(include=["pg_backup_api", "pg_backup_api.*"]),
    package_data={"pg_backup_api": ["openapi.json", "templates/*.html", "static/*"]},
    python_requires=">=3.9",
    install_requires=["flask>=2.2", "requests>=2.28", "barman>=3.4,<4", "jsonschema>=4.17", "prometheus_client>=0.17",
                      # The operation index asks the kernel which job files appeared (Linux only).
                      "inotify_simple>=1.3; sys_platform == 'linux'"],
    entry_points={"console_scripts": ["pg-backup-api = pg_backup_api.cli:main"]},
    classifiers=["Programming Language :: Python :: 3"],
)
