FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config config
COPY server server
COPY storage storage
RUN pip install --no-cache-dir .
EXPOSE 11112
ENTRYPOINT ["hilum"]
CMD ["serve"]
