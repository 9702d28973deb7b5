// A service written in Java logging its predictions to kdwatch: Apache's kafka-clients and contract v1
// (JSON, keyed by request_id), nothing kdwatch-specific. Usage: PredictionProducer BOOTSTRAP TOPIC N TS0
import java.util.Locale;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;

public final class PredictionProducer {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], topic = args[1];
        int n = Integer.parseInt(args[2]);
        long ts0 = Long.parseLong(args[3]);
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.LINGER_MS_CONFIG, "10");
        props.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(props)) {
            for (int i = 0; i < n; i++) {
                String requestId = "java-" + i;
                double p = 0.6 + 0.3 * ((i % 10) / 10.0);
                String value = String.format(Locale.ROOT,
                    "{\"request_id\":\"%s\",\"model\":\"java-svc\",\"student_version\":\"j1\",\"ts\":%d,"
                        + "\"probs\":[%.6f,%.6f],\"latency_ms\":%.3f,\"features\":{\"x\":%d,\"lang\":\"java\"}}",
                    requestId, ts0 + i * 100L, p, 1.0 - p, 1.5 + (i % 7), i % 13);
                producer.send(new ProducerRecord<>(topic, requestId, value));
            }
            producer.flush();
        }
    }
}
