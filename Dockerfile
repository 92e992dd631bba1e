# One image for the worker, the model server and Flower. The package is
# installed from the wheel built in the first stage, as users install it;
# only the Celery app (workers/) is copied as source.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cbtasks ./cbtasks
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
COPY --from=build /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/cbtasks-*.whl)[http,server,grpc,metrics]" flower \
    && rm -rf /dist
WORKDIR /app
COPY workers ./workers
RUN useradd --create-home cbtasks
USER cbtasks
