// keelson's demo app: a tiny HTTP service that says which version it is and
// where it runs. `keelson up --demo` compiles it with javac into one
// artifact per version; the host daemon starts it with KEELSON_BIND_ADDRESS
// set to the instance's address (127.0.0.2, 127.0.0.3, …).

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

public final class Demo {
    public static void main(String[] args) throws IOException {
        String address = env("KEELSON_BIND_ADDRESS", "127.0.0.1");
        int port = Integer.parseInt(env("DEMO_PORT", "8080"));
        String version = Files.readString(Path.of("VERSION")).trim();
        String instance = env("KEELSON_HOST", address);
        HttpServer server = HttpServer.create(new InetSocketAddress(address, port), 64);
        server.createContext("/healthz", exchange -> reply(exchange, 200, "ok\n"));
        server.createContext("/", exchange -> reply(exchange, 200,
                "demo " + version + " on " + address + ":" + port + " (" + instance + ")\n"));
        server.start();
        System.out.println("demo " + version + " listening on " + address + ":" + port);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("demo " + version + " stopping");
            server.stop(0);
        }));
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static void reply(HttpExchange exchange, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }
}
