"""A local HTTP server on 127.0.0.1 for the download tests (nothing here touches the network)."""

import functools
import http.server
import socket
import threading


class LocalServer:
    """Serves one directory. `drop_after` cuts responses short after that many bytes;
    `trickle` sends one byte every `trickle` seconds (a server too slow to ever finish);
    `headers` are added to every response (e.g. the Hub's X-Linked-Etag); a callable gets the
    request path and returns them, for headers that differ by file."""

    def __init__(self, directory, drop_after=None, headers=None, trickle=None):
        drop = drop_after
        headers_for = headers if callable(headers) else (lambda path, fixed=dict(headers or {}): fixed)
        stop = self.stopping = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def end_headers(self):
                for key, value in headers_for(self.path).items():
                    self.send_header(key, value)
                super().end_headers()

            def copyfile(self, source, outputfile):
                if trickle is not None:
                    while not stop.is_set() and (byte := source.read(1)):
                        outputfile.write(byte)
                        outputfile.flush()
                        stop.wait(trickle)
                    return None
                if drop is None:
                    return super().copyfile(source, outputfile)
                outputfile.write(source.read(drop))  # promise the full length, send part, hang up
                outputfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url(path="file"):
    """A URL on 127.0.0.1 where nobody listens: what a download sees offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"
