# One image for the worker, the model server and Flower.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cbtasks ./cbtasks
COPY workers ./workers
RUN pip install --no-cache-dir '.[http,server,grpc,metrics]' flower
RUN useradd --create-home cbtasks
USER cbtasks
