"""A minimal Django project (settings and URLs in one module) for the Django snippets of INTEGRATION.md."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path

SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.django_site"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
USE_TZ = True


def chat(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"choices": []})


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [path("v1/chat/completions", chat), path("healthz", healthz)]
